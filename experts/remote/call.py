"""One remote call as autograd sees it: `RemoteExpertsCall` sends each expert its input slice forward and
its gradient slice backward (through `RemotePool.forward_call` / `backward_call`), `PendingCall`
remembers a forward for its backward, and `Answers` gathers the replies of one round.

Legend: A assignments sorted by expert, D model width.
"""

from __future__ import annotations

import itertools
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


class Answers:
    """Every expert's answer in one tensor, rows in slice order. Each answer is copied in as it arrives,
    while other experts are still computing, rather than all concatenated after the last one; a slice
    with no answer is zeros (written only there)."""

    def __init__(self, slices: list[torch.Tensor], dtype: torch.dtype):
        self.bounds = list(itertools.pairwise(itertools.accumulate((len(s) for s in slices), initial=0)))
        self.rows_AD = slices[0].new_empty((self.bounds[-1][1], *slices[0].shape[1:]), dtype=dtype)
        self.given: set[int] = set()

    def put(self, expert: int, answer: torch.Tensor) -> None:
        """`expert`'s answer, cast to the dtype of the whole."""
        start, end = self.bounds[expert]
        self.rows_AD[start:end].copy_(answer)
        self.given.add(expert)

    def gathered(self) -> torch.Tensor:
        """All answers, zeros where none was put."""
        for expert, (start, end) in enumerate(self.bounds):
            if expert not in self.given:
                self.rows_AD[start:end].zero_()
        return self.rows_AD
