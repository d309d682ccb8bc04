"""One remote call as autograd sees it: `RemoteExpertsCall` sends each expert its input slice forward and
its gradient slice backward (through `RemotePool.forward_call` / `backward_call`), and `PendingCall`
remembers a forward for its backward.

Legend: A assignments sorted by expert, D model width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from router.plan import DispatchPlan

if TYPE_CHECKING:
    from experts.remote.client import RemotePool


@dataclass
class PendingCall:
    """One forward call, remembered for its backward."""

    id: int
    sizes: list[int]
    answered: list[int]  # experts with tokens whose output was accepted
    grad_input: bool


class RemoteExpertsCall(torch.autograd.Function):
    """Autograd through a remote call: forward sends x slices, backward sends grad_out slices."""

    @staticmethod
    def forward(
        ctx, pool: RemotePool, plan: DispatchPlan, x_AD: torch.Tensor, anchor: torch.Tensor, step: int
    ):
        grad_input = ctx.needs_input_grad[2]
        y_AD, answered_E, call = pool.forward_call(x_AD, plan, step, keep=True, grad_input=grad_input)
        ctx.pool, ctx.call, ctx.x_meta = pool, call, (x_AD.device, x_AD.dtype)
        ctx.mark_non_differentiable(answered_E)
        return y_AD, answered_E

    @staticmethod
    def backward(ctx, grad_y_AD: torch.Tensor, _grad_answered):
        grad_x_AD = ctx.pool.backward_call(ctx.call, grad_y_AD, *ctx.x_meta)
        return None, None, grad_x_AD, None, None


def answers_or_zeros(answers: dict[int, torch.Tensor], slices: list, dtype: torch.dtype) -> torch.Tensor:
    """Every expert's answer in order, zeros shaped like its slice where it gave none (made only there)."""
    return torch.cat(
        [answers[e] if e in answers else s.new_zeros(s.shape, dtype=dtype) for e, s in enumerate(slices)]
    )
