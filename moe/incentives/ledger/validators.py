"""How each simulated validator behaviour sets its weight row over a subnet's miners at an epoch.

Rows are raw, non-negative and of any scale; the ledger stores them as u16 and Yuma normalises them.
Only ``honest`` (and ``lazy`` at its first epoch) looks at the validator's PoI view, so ``view_M`` is a
callable: the other behaviours never cost a view.

Shape legend: M = miners of one subnet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe.incentives.ledger.config import ValidatorSpec
from router.seeds import torch_generator


@dataclass(frozen=True)
class EpochInputs:
    """What a validator's weight-setting behaviour may look at."""

    validator: int
    spec: ValidatorSpec
    subnet: str
    num_miners: int
    epoch: int
    # Epochs this subnet has already run (0 at its first epoch).
    epochs_run: int
    seed: int
    # The subnet's consensus at its last epoch, in units of 1e-9 (None before the first epoch).
    last_consensus_fixed: list[int] | None
    # This validator's u16 row at the subnet's last epoch (None before the first epoch).
    last_row_u16: list[int] | None
    view_M: Callable[[], torch.Tensor]
    failing_M: torch.Tensor


def honest_weights(inputs: EpochInputs) -> torch.Tensor:
    """The validator's PoI view: negatives clipped to 0, failing miners zeroed (normalised by Yuma)."""
    view_M = torch.nan_to_num(inputs.view_M().detach().to("cpu", torch.float64), nan=0.0, posinf=0.0)
    return torch.where(inputs.failing_M, 0.0, view_M.clamp_min(0.0))


def copier_weights(inputs: EpochInputs) -> torch.Tensor:
    """Last epoch's consensus of the subnet (nothing before the first epoch)."""
    if not inputs.last_consensus_fixed:
        return torch.zeros(inputs.num_miners, dtype=torch.float64)
    return torch.tensor(inputs.last_consensus_fixed, dtype=torch.float64)


def cabal_weights(inputs: EpochInputs) -> torch.Tensor:
    """Everything on the cabal's own miners (indices outside this subnet are ignored)."""
    row_M = torch.zeros(inputs.num_miners, dtype=torch.float64)
    members = [miner for miner in inputs.spec.cabal_miners if miner < inputs.num_miners]
    row_M[members] = 1.0
    return row_M


def random_weights(inputs: EpochInputs) -> torch.Tensor:
    """Uniform noise, seeded by (run seed, validator, subnet, epoch) so a resumed run draws the same."""
    generator = torch_generator(
        inputs.seed, "ledger", "random", inputs.validator, inputs.subnet, inputs.epoch
    )
    return torch.rand(inputs.num_miners, generator=generator, dtype=torch.float64)


def lazy_weights(inputs: EpochInputs) -> torch.Tensor:
    """Honest once, at the subnet's first epoch; the same stale row ever after."""
    if inputs.epochs_run == 0 or inputs.last_row_u16 is None:
        return honest_weights(inputs)
    return torch.tensor(inputs.last_row_u16, dtype=torch.float64)


WEIGHT_SETTERS: dict[str, Callable[[EpochInputs], torch.Tensor]] = {
    "honest": honest_weights,
    "weight_copier": copier_weights,
    "cabal": cabal_weights,
    "random": random_weights,
    "lazy": lazy_weights,
}
