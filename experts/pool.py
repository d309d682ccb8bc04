"""Expert pools: where experts compute. `LocalPool` runs them in this process; `RemotePool` in workers.

Both take the gathered inputs of one step in plan order and return the outputs in the same order,
plus which experts answered. Expert parameters belong to the pool, not to the trunk: the pool's own
per-expert optimizers step them (`step()`), as a miner owns and steps its experts.

Legend: A assignments sorted by expert, D model width, E experts.
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from experts.behaviours import HONEST, Behaviour, ExpertFailure, answer_call
from experts.commitments import AuditAnswer, CallRecord, answer_audit, record_call
from experts.latency import ReplyTimes
from experts.network import FaultPolicy, LinkSpec, VirtualNetwork
from experts.owner import ExpertOwner, OptimizerSettings, step_owners
from experts.rows import ComputeSettings
from experts.stacking import stack_parameters
from router.plan import DispatchPlan

log = logging.getLogger(__name__)


@dataclass
class PoolOutput:
    y_AD: torch.Tensor  # expert outputs in plan order; rows of failed experts are zero
    answered_E: (
        torch.Tensor
    )  # bool [E]: expert e returned a valid output this step (True if it had no tokens)


class ExpertPool(ABC):
    """The interface the MoE layer uses; implementations must give identical numerics with no faults.

    Failures are reported per expert for the scorer and the ledger: `last_failures` maps each expert
    that failed in the latest forward/backward to why ("timeout", "straggler", "dead", "backoff",
    "invalid: ...", "error: ..."); `failure_counts` counts (expert, reason) over the pool's life.
    """

    num_experts: int
    last_failures: dict[int, str]
    failure_counts: Counter
    # PoI takes extra gradients to the MoE layer outputs (taylor's curvature, fresh views). Inside
    # `only_input_gradients()`, a backward through this pool must only return input gradients: leave
    # every owner's parameter gradients alone and keep the forward for the training backward. Pools
    # that honour it say so with `repeatable_backward`; PoI skips the layers above the others.
    repeatable_backward: bool = False
    _input_gradients_only: bool = False
    # What a simulated network and `slow:ms` behaviours cost, in virtual time (nothing sleeps): the
    # trainer adds them to wall time for `perf/sim_tokens_per_s`. Pools without simulation keep 0.
    simulated_latency_ms: float = 0.0  # slowest behaviour delay among this step's called experts
    # Audits (experts/commitments.py): with `enable_audits(window)` every training call (grad enabled)
    # leaves its `CallRecord` in `last_call`, and owners keep their last `window` versions.
    audit_window: int = 0
    last_call: CallRecord | None = None
    _evaluating: bool = False  # inside `evaluation_calls()`
    reply_times: ReplyTimes  # each expert's expected reply time, measured by training calls

    @property
    def reply_time_E(self) -> torch.Tensor:
        """Each expert's expected reply time in seconds (float64 [E]): an EMA with factor
        `policy.latency_ema` over training calls, NaN until an expert's first measured call (always NaN in
        a `LocalPool` without a simulated network, whose replies take no virtual time). See experts/latency.py."""
        return self.reply_times.reply_time_E

    def observe_reply_times(self, waited_s: dict[int, float], unanswered, training: bool) -> None:
        """Fold one round's reply times into `reply_time_E`; only training calls count (not a scorer's
        evaluation passes, not validation), so the estimate measures the work the run pays for."""
        if training and not self._evaluating:
            self.reply_times.observe(waited_s, unanswered)

    @contextmanager
    def evaluation_calls(self) -> Iterator[None]:
        """Calls inside are a scorer's evaluation passes, not training calls: they leave the training
        call's audit record (and the gradient it keeps) alone."""
        before, self._evaluating = self._evaluating, True
        try:
            yield
        finally:
            self._evaluating = before

    @property
    def records_calls(self) -> bool:
        """Whether the next call is kept for audits: audits on, and not an evaluation pass."""
        return bool(self.audit_window) and not self._evaluating

    @property
    def network_clock_s(self) -> float:
        """Virtual seconds this pool's simulated network has waited so far (0 without one)."""
        return 0.0

    @abstractmethod
    def forward(self, x_AD: torch.Tensor, plan: DispatchPlan, step: int = 0) -> PoolOutput:
        """Each expert's output for its slice of `x_AD`; `step` is the training step the call belongs to
        (behaviours such as `crash:s`, `stale:s` and their random draws depend on it)."""

    @abstractmethod
    def step(self, training_step: int) -> None:
        """Each owner clips, steps and zeroes its experts' gradients after training step `training_step`."""

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    def train(self, mode: bool = True) -> None:  # noqa: B027  (optional hook)
        """Switch experts between training and evaluation behaviour."""

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Release workers, sockets or files."""

    def __call__(self, x_AD: torch.Tensor, plan: DispatchPlan, step: int = 0) -> PoolOutput:
        return self.forward(x_AD, plan, step)

    @contextmanager
    def only_input_gradients(self) -> Iterator[None]:
        """Backward passes inside ask the owners for input gradients only (see `repeatable_backward`)."""
        self._input_gradients_only = True
        try:
            yield
        finally:
            self._input_gradients_only = False

    def enable_audits(self, window: int) -> None:
        """Owners commit after every step and keep `window` versions; calls leave a `CallRecord`."""
        raise NotImplementedError(f"{type(self).__name__} does not support audits")

    def audit(self, expert: int, version: int, timeout: float) -> AuditAnswer:
        """Ask expert `expert`'s owner for its state at `version`; raises `AuditRefused`."""
        raise NotImplementedError(f"{type(self).__name__} does not support audits")

    def expert_replica(self, expert: int) -> tuple[nn.Module, OptimizerSettings]:
        """A fresh module shaped like expert `expert` (its parameters are the auditor's to load) and the
        optimizer settings its owner steps with, for re-running a call and replaying a step."""
        raise NotImplementedError(f"{type(self).__name__} does not support audits")

    def published_commitment(self, expert: int, version: int) -> torch.Tensor | None:
        """The parameter sketch expert `expert`'s owner published for `version` (None: not seen, as
        for the parameters it was hosted with)."""
        return None

    def missing_commitment(self, expert: int, version: int) -> bool:
        """Whether expert `expert`'s owner announced `version` without publishing its commitment (an
        audit of that version, or of the step to it, then fails: it must not switch the check off)."""
        return False

    def load_reply_times(self, state: dict) -> None:
        """The reply-time estimates of a pool state (a checkpoint from before they existed has none:
        the estimates start unmeasured)."""
        if "reply_time_E" in state:
            self.reply_times.load_state_dict(state)

    def keep_call(self, step: int, sizes: list[int], versions: list[int], x_AD, y_AD) -> None:
        """Record a training call for audits (the caller knows it is one: not an evaluation)."""
        if self.records_calls:
            self.last_call = record_call(step, sizes, versions, x_AD, y_AD)

    def keep_output_gradient(self, grad_y_AD: torch.Tensor) -> None:
        """The gradient the latest call's outputs got in the training backward (not PoI's extra ones)."""
        if self.last_call is not None and not self._input_gradients_only:
            self.last_call.grad_y_AD = grad_y_AD.detach()

    def move_expert(self, expert: int, link: LinkSpec, host: str | None) -> None:
        """Re-host expert `expert` on `host` (a market move) behind the simulated `link`, keeping its
        parameters and optimizer state."""
        raise NotImplementedError(f"{type(self).__name__} cannot move experts")

    def set_behaviours(self, behaviours: dict[int, Behaviour], *, seed: int, layer: str) -> None:
        """Expert e answers as `behaviours[e]` (honest where absent), with draws from (seed, layer, step, e)."""
        self.behaviours, self.behaviour_seed, self.layer_name = dict(behaviours), seed, layer


def expected_dtypes(x_aD: torch.Tensor) -> set[torch.dtype]:
    """An expert answers in its input's dtype, or in the autocast dtype when autocast is on."""
    return {x_aD.dtype, answer_dtype(x_aD)}


def answer_dtype(x_AD: torch.Tensor) -> torch.dtype:
    """The dtype a pool answers in: autocast's where it is on for `x_AD`'s device, else the input's.
    Every answer is cast to it (a failed or lazy expert's zeros too), so the layer combines in one dtype
    whichever experts answered and wherever they computed."""
    device = x_AD.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_AD.dtype


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """0-d bool: no NaN or ±inf in `t`. One min/max pass: 15x faster on CPU than `isfinite(t).all()`,
    which writes a bool per element (NaN propagates through both extremes)."""
    if not t.numel():
        return torch.ones((), dtype=torch.bool, device=t.device)
    lowest, highest = torch.aminmax(t.detach())
    return torch.isfinite(lowest) & torch.isfinite(highest)


def invalid_outputs(
    y_slices: list[torch.Tensor],
    x_slices: list[torch.Tensor],
    max_norm: float,
    dtypes: set[torch.dtype] | None = None,
) -> dict[int, str]:
    """Experts whose output is not a finite tensor shaped like its input and of one of `dtypes` (None:
    `expected_dtypes` of the input), or whose per-token L2 norm exceeds `max_norm` (0: no bound); one
    host sync for all experts."""
    reasons, checks = {}, []
    for e, (y_aD, x_aD) in enumerate(zip(y_slices, x_slices, strict=True)):
        if y_aD.shape != x_aD.shape or y_aD.dtype not in (dtypes or expected_dtypes(x_aD)):
            reasons[e] = f"invalid: {y_aD.dtype}{tuple(y_aD.shape)} for input {x_aD.dtype}{tuple(x_aD.shape)}"
        elif y_aD.numel():
            checks.append((e, _out_of_bounds(y_aD.detach(), max_norm)))
    flags = torch.stack([bad for _, bad in checks]).tolist() if checks else []
    for (e, _), bad in zip(checks, flags, strict=True):
        if bad:
            reasons[e] = "invalid: non-finite or norm above max_output_norm"
    return reasons


def _out_of_bounds(y_aD: torch.Tensor, max_norm: float) -> torch.Tensor:
    """0-d bool: `y_aD` holds NaN or ±inf, or a row norm above `max_norm` (0: no bound). With a bound, one
    pass: a NaN or ±inf anywhere makes its row's norm, and so the largest, NaN or inf, which fails `<=`."""
    if max_norm > 0:
        return ~(y_aD.float().norm(dim=-1).max() <= max_norm)
    return ~all_finite(y_aD)


class LocalPool(ExpertPool):
    """Experts in this process: one gather (done by the layer), a matmul per contiguous slice."""

    repeatable_backward = True  # autograd.grad to activations never touches parameter gradients

    def __init__(
        self,
        experts: list[nn.Module],
        optimizer: OptimizerSettings | None = None,
        *,
        policy: FaultPolicy | None = None,
        network: VirtualNetwork | None = None,
        device: torch.device | str = "cpu",
        compute: ComputeSettings | None = None,
    ):
        """Each expert's owner trains it with `optimizer` and computes its rows as `compute` says (an
        `ExpertsConfig` is both; default: their defaults). Outputs are checked against
        `policy.max_output_norm` (a transport config is its own `FaultPolicy`). `network` simulates
        links in virtual time; experts it fails do not compute, as their remote answer would not have
        arrived."""
        self.experts = nn.ModuleList(experts).to(device)
        self.num_experts = len(experts)
        self.owners = [ExpertOwner(expert, optimizer, compute) for expert in self.experts]
        for owner, stacked in zip(self.owners, stack_parameters(list(self.experts)), strict=True):
            owner.stacked = stacked
        self.policy = policy or FaultPolicy()
        self.network = network
        self.reply_times = ReplyTimes(self.num_experts, self.policy.latency_ema)
        self.last_failures: dict[int, str] = {}
        self.failure_counts: Counter = Counter()
        self.behaviours: dict[int, Behaviour] = {}
        self.behaviour_seed, self.layer_name = 0, ""
        self.simulated_latency_ms = 0.0
        self.hosts: list[str | None] = [None] * self.num_experts  # market placement (simulated hosts)

    def move_expert(self, expert: int, link: LinkSpec, host: str | None) -> None:
        """A market move: the expert keeps its parameters and optimizer and answers over `link` now."""
        if self.network is None:
            raise ValueError("move_expert needs a simulated network: build the pool with a placement")
        self.network.move_expert(expert, link, host)
        self.hosts[expert] = host

    def forward(self, x_AD: torch.Tensor, plan: DispatchPlan, step: int = 0) -> PoolOutput:
        sizes = plan.split_sizes()
        x_slices = x_AD.split(sizes)
        failures = {}
        if self.network is not None:
            row_bytes = x_AD.shape[-1] * x_AD.element_size()
            failures = self.network.deliver(
                plan.token_idx, sizes, plan.num_tokens, row_bytes, self.reply_time_E
            )
            self.observe_reply_times(self.network.last_waits_s, failures, torch.is_grad_enabled())
        dtype = answer_dtype(x_AD)
        y_slices = [
            x_aD.new_zeros(x_aD.shape, dtype=dtype) if e in failures else self.answer(e, x_aD, step, failures)
            for e, x_aD in enumerate(x_slices)
        ]
        self.simulated_latency_ms = max(
            (self.behaviours[e].latency_ms for e in self.behaviours if sizes[e] > 0), default=0.0
        )
        invalid = invalid_outputs(y_slices, x_slices, self.policy.max_output_norm)
        for e in invalid:  # a rejected output must not train its expert: drop it from the graph
            y_slices[e] = x_slices[e].new_zeros(x_slices[e].shape, dtype=dtype)
        failures |= invalid
        self.last_failures = failures
        self.failure_counts.update(failures.items())
        answered_E = torch.ones(self.num_experts, dtype=torch.bool)
        answered_E[list(failures)] = False
        y_AD = torch.cat([y_aD.to(dtype) for y_aD in y_slices])
        if self.records_calls and torch.is_grad_enabled():
            versions = [-1 if e in failures else owner.version for e, owner in enumerate(self.owners)]
            self.keep_call(step, sizes, versions, x_AD, y_AD)
            if y_AD.requires_grad:
                y_AD.register_hook(self.keep_output_gradient)
        return PoolOutput(y_AD, answered_E.to(x_AD.device))

    def answer(self, e: int, x_aD: torch.Tensor, step: int, failures: dict[int, str]) -> torch.Tensor:
        """Expert e's reply under its behaviour; a behaviour's failure is recorded in `failures`."""
        behaviour = self.behaviours.get(e, HONEST)
        if behaviour == HONEST or x_aD.shape[0] == 0:
            return self.owners[e].forward(x_aD)
        try:
            return answer_call(
                self.experts[e],
                behaviour,
                x_aD,
                seed=self.behaviour_seed,
                layer=self.layer_name,
                step=step,
                expert_idx=e,
                peer=lambda j, x_aD: self.owners[j].forward(x_aD),
                rows=self.owners[e].row_buckets,
            )
        except ExpertFailure as failure:
            failures[e] = f"behaviour: {failure}"
            return x_aD.new_zeros(x_aD.shape, dtype=answer_dtype(x_aD))

    def enable_audits(self, window: int) -> None:
        self.audit_window = window
        for owner in self.owners:
            owner.keep_states(window)

    def audit(self, expert: int, version: int, timeout: float) -> AuditAnswer:
        return answer_audit(self.owners[expert].trail, version)

    def published_commitment(self, expert: int, version: int) -> torch.Tensor | None:
        return self.owners[expert].commitment_at(version)

    def expert_replica(self, expert: int) -> tuple[nn.Module, OptimizerSettings]:
        return copy.deepcopy(self.experts[expert]), self.owners[expert].settings

    def step(self, training_step: int) -> None:
        learns = [self.behaviours.get(e, HONEST).learns_at(training_step) for e in range(self.num_experts)]
        for e, report in enumerate(step_owners(self.owners, learns)):
            if report.skipped:  # counted as a worker's STEPPED ack is; the next call replaces last_failures
                self.failure_counts[(e, f"step: {report.skipped}")] += 1

    @property
    def network_clock_s(self) -> float:
        return self.network.clock_s if self.network is not None else 0.0

    def parameters(self):
        return self.experts.parameters()

    def train(self, mode: bool = True) -> None:
        self.experts.train(mode)

    def state_dict(self) -> dict:
        """Parameters and optimizer state per expert, in the layout `RemotePool` shares."""
        states = [owner.state_dict() for owner in self.owners]
        return {
            "experts": [s["module"] for s in states],
            "optimizers": [s["optimizer"] for s in states],
            **self.reply_times.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Every expert's state; one missing from an incomplete checkpoint (None) keeps its initial weights."""
        self.load_reply_times(state)
        pairs = zip(self.owners, state["experts"], state["optimizers"], strict=True)
        for e, (owner, module_state, optimizer_state) in enumerate(pairs):
            if module_state is None:
                log.warning("expert %d is missing from the checkpoint; it keeps its initial weights", e)
                continue
            owner.load_state_dict({"module": module_state, "optimizer": optimizer_state})
