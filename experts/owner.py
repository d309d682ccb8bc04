"""The owner of one expert: its module, its optimizer, and the step it takes after each backward.

A miner owns and steps its experts; so does `LocalPool` for the experts in the trainer process. Both
hold one `ExpertOwner` per expert, so clipping, stepping, the non-finite check and a stale owner's
refusal to learn are written once (after hivemind's `ModuleBackend`, which holds module and optimizer
and applies the step).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from experts.commitments import AuditTrail
from experts.rows import ComputeSettings, RowBuckets
from experts.stacking import ParameterStack


@dataclass
class OptimizerSettings:
    """How an owner trains its expert (each expert has its own AdamW); sent to workers when they host
    an expert. `ExpertsConfig` inherits these fields (`experts.lr`), so its defaults are these."""

    lr: float = 3e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # gradient norm clip the owner applies before its step; 0 disables it


def plain_settings(source: object) -> OptimizerSettings:
    """The `OptimizerSettings` fields of `source` (these settings, or a config that inherits them)."""
    return OptimizerSettings(**{f.name: getattr(source, f.name) for f in fields(OptimizerSettings)})


@dataclass(frozen=True)
class StepReport:
    skipped: str | None = None  # why the optimizer did not step (None: it stepped, or does not learn)
    grad_norm: float | None = None  # total gradient norm before clipping; None when non-finite


class ExpertOwner:
    """One expert and its AdamW; `forward` computes its rows (in their row bucket, experts/rows.py);
    `step` clips, steps and zeroes, or skips on a non-finite gradient."""

    def __init__(
        self,
        module: nn.Module,
        settings: OptimizerSettings | None = None,
        compute: ComputeSettings | None = None,
    ):
        self.module = module
        self.row_buckets = RowBuckets.parse((compute or ComputeSettings()).row_buckets)
        # a plain copy: a config's attribute reads (omegaconf) cost more than a small expert's clip
        self.settings = settings = plain_settings(settings or OptimizerSettings())
        # fused: one kernel for every parameter instead of a dozen passes each; 3.7x faster on CPU for a
        # 512x2048 expert (benchmarks/transport.py), where the owner's step is a third of its work
        self.optimizer = torch.optim.AdamW(
            module.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, fused=True
        )
        self.steps = 0  # optimizer steps taken: the version of the parameters
        self.trail: AuditTrail | None = None  # what audits of recent versions need (`keep_states`)
        self.stacked: tuple[ParameterStack, int] | None = None  # (stack, row) where a pool stacked it

    def forward(self, x_aD: torch.Tensor) -> torch.Tensor:
        """The expert's output on its rows `x_aD`, computed in their row bucket when one applies."""
        return self.row_buckets.call(self.module, x_aD)

    @property
    def version(self) -> int:
        """The version id of the current parameters: the number of optimizer steps taken."""
        return self.steps

    def keep_states(self, window: int) -> None:
        """From now on commit to the parameters after every step and keep the states of the last
        `window` versions for audits (0: keep none)."""
        self.trail = AuditTrail(window) if window > 0 else None
        self.commit()

    def commit(self, sketch_P: torch.Tensor | None = None) -> torch.Tensor | None:
        """Commit to the current version (after a step, a load), when keeping states for audits; returns
        the parameter commitment (`sketch_P`: computed already, see `commit_owners`)."""
        if self.trail is None:
            return None
        return self.trail.record(self.version, self.module, self.optimizer, sketch_P)

    def commitment_at(self, version: int) -> torch.Tensor | None:
        """The parameter commitment of `version`, if still kept (what its owner published)."""
        return self.trail.commitment(version) if self.trail is not None else None

    def gradient_norm(self, *, zero_missing_grads: bool = False) -> torch.Tensor | None:
        """Total gradient norm before clipping (0-d, no host sync), clipping when configured; None when
        no parameter has a gradient. `zero_missing_grads`: a remote expert called with no tokens gets
        the zero gradients autograd gives it in-process, so AdamW still moves its momentum."""
        if zero_missing_grads:
            for param in self.module.parameters():
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return None
        if self.settings.grad_clip > 0:
            return nn.utils.clip_grad_norm_(self.module.parameters(), self.settings.grad_clip)
        return nn.utils.get_total_norm(grads)

    def apply_step(self, grad_norm: float | None) -> StepReport:
        """Step unless `grad_norm` (from `gradient_norm`) is non-finite; committing to the new version
        and zeroing the gradients are the caller's (`step_owners`, which batches the commitments)."""
        if grad_norm is not None and not math.isfinite(grad_norm):
            return StepReport(skipped="non-finite gradient")
        self.optimizer.step()
        self.steps += 1
        return StepReport(grad_norm=grad_norm or 0.0)

    def step(self, *, learns: bool = True, zero_missing_grads: bool = False) -> StepReport:
        """This owner's step after a backward; a stale owner (`learns` False) only drops its gradients."""
        return step_owners([self], [learns], zero_missing_grads=[zero_missing_grads])[0]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        optimizer_state = self.optimizer.state_dict()
        return {"module": self.module.state_dict(), "optimizer": optimizer_state, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        """Parameters and optimizer state; the step count too where `state` has one (a state in a
        pool's layout, which keeps no counts, leaves it as it is)."""
        self.module.load_state_dict(state["module"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if "steps" in state:
            self.steps = int(state["steps"])
        if self.trail is not None:  # the loaded state is a new history: older versions are not this one's
            self.keep_states(self.trail.window)


def step_owners(
    owners: Sequence[ExpertOwner], learns: Sequence[bool], zero_missing_grads: Sequence[bool] | None = None
) -> list[StepReport]:
    """Every owner's step, reading all gradient norms back from the device in one host sync."""
    zero_missing_grads = zero_missing_grads or [False] * len(owners)
    norms = [
        owner.gradient_norm(zero_missing_grads=zero) if learning else None
        for owner, learning, zero in zip(owners, learns, zero_missing_grads, strict=True)
    ]
    measured = [norm for norm in norms if norm is not None]
    values = torch.stack([n.float() for n in measured]).tolist() if measured else []
    values = iter(values)
    reports = [
        owner.apply_step(None if norm is None else next(values)) if learning else StepReport()
        for owner, learning, norm in zip(owners, learns, norms, strict=True)
    ]  # a stale owner (not learning) has stopped: it only drops its gradients
    stepped = [
        owner
        for owner, learning, report in zip(owners, learns, reports, strict=True)
        if learning and not report.skipped
    ]
    commit_owners(stepped)
    for owner in owners:
        owner.zero_grad()
    return reports


def commit_owners(owners: Sequence[ExpertOwner]) -> None:
    """Each owner commits to its new version (those keeping states for audits). Where two or more
    owners' parameters are still rows of one `ParameterStack`, their sketches come from one batched
    pass over the stack."""
    keeping = [owner for owner in owners if owner.trail is not None]
    rows = {
        id(owner): owner.stacked
        for owner in keeping
        if owner.stacked and owner.stacked[0].holds(owner.stacked[1])
    }
    stacks = Counter(stack for stack, _ in rows.values())
    batches_GP = {stack: stack.sketches_GP() for stack, count in stacks.items() if count >= 2}
    for owner in keeping:
        stack, row = rows.get(id(owner), (None, 0))
        owner.commit(batches_GP[stack][row] if stack in batches_GP else None)
