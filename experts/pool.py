"""Expert pools: where experts compute. `LocalPool` runs them in this process; `RemotePool` in workers.

Both take the gathered inputs of one step in plan order and return the outputs in the same order,
plus which experts answered. Expert parameters belong to the pool, not to the trunk: the pool's own
per-expert optimizers step them (`step()`), as a miner owns and steps its experts.

Legend: A assignments sorted by expert, D model width, E experts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from router.plan import DispatchPlan


@dataclass
class PoolOutput:
    y_AD: torch.Tensor  # expert outputs in plan order; rows of failed experts are zero
    answered_E: torch.Tensor  # bool [E]: expert e returned a valid output this step (True if it had no tokens)


class ExpertPool(ABC):
    """The interface the MoE layer uses; implementations must give identical numerics with no faults."""

    num_experts: int

    @abstractmethod
    def forward(self, x_AD: torch.Tensor, plan: DispatchPlan) -> PoolOutput: ...

    @abstractmethod
    def step(self) -> None:
        """Each owner clips, steps and zeroes its experts' gradients."""

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    def train(self, mode: bool = True) -> None:  # noqa: B027  (optional hook)
        """Switch experts between training and evaluation behaviour."""

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Release workers, sockets or files."""

    def __call__(self, x_AD: torch.Tensor, plan: DispatchPlan) -> PoolOutput:
        return self.forward(x_AD, plan)


def make_optimizer(expert: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(expert.parameters(), lr=lr, weight_decay=weight_decay)


class LocalPool(ExpertPool):
    """Experts in this process: one gather (done by the layer), a matmul per contiguous slice."""

    def __init__(
        self,
        experts: list[nn.Module],
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        grad_clip: float = 0.0,
        device: torch.device | str = "cpu",
    ):
        self.experts = nn.ModuleList(experts).to(device)
        self.num_experts = len(experts)
        self.grad_clip = grad_clip
        self.optimizers = [make_optimizer(e, lr, weight_decay) for e in self.experts]

    def forward(self, x_AD: torch.Tensor, plan: DispatchPlan) -> PoolOutput:
        sizes = plan.split_sizes()
        y_slices = [expert(x_aD) for expert, x_aD in zip(self.experts, x_AD.split(sizes), strict=True)]
        answered_E = torch.ones(self.num_experts, dtype=torch.bool, device=x_AD.device)
        return PoolOutput(torch.cat(y_slices), answered_E)

    def step(self) -> None:
        for expert, optimizer in zip(self.experts, self.optimizers, strict=True):
            if self.grad_clip > 0:
                nn.utils.clip_grad_norm_(expert.parameters(), self.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def parameters(self):
        return self.experts.parameters()

    def train(self, mode: bool = True) -> None:
        self.experts.train(mode)

    def state_dict(self) -> dict:
        return {
            "experts": [e.state_dict() for e in self.experts],
            "optimizers": [o.state_dict() for o in self.optimizers],
        }

    def load_state_dict(self, state: dict) -> None:
        for expert, expert_state in zip(self.experts, state["experts"], strict=True):
            expert.load_state_dict(expert_state)
        for optimizer, optimizer_state in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(optimizer_state)
