"""The trainer's pool of remote experts: `RemotePool` sends one request per expert per call, with
every token routed to it, all in flight at once through the `Coordinator`, and applies the
`FaultPolicy` (timeouts, k_min, straggler cut-off, output validation, back-off).

Autograd runs through the call (`RemoteExpertsCall`): backward sends each expert its slice of
grad_out and receives grad_in; the worker kept its forward graph. While the pool is inside
`only_input_gradients()` (PoI's extra backwards), BACKWARD says `input_only`: the worker returns
grad_in only, keeping its forward and its parameter gradients as they were.

Legend: A assignments sorted by expert, a rows of one expert, D model width, E experts.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from dataclasses import asdict

import torch
from torch import nn

from experts.behaviours import HONEST
from experts.commitments import AuditAnswer, AuditRefused, OwnerState, param_sketch_P, well_formed_sketch
from experts.errors import CheckpointError, WireError
from experts.latency import ReplyClock, ReplyTimes
from experts.modules import build_expert, expert_spec
from experts.network import FailureMemory, FaultPolicy, LinkSpec, NetworkConfig, Round
from experts.owner import OptimizerSettings
from experts.pool import ExpertPool, PoolOutput, all_finite, answer_dtype, expected_dtypes, invalid_outputs
from experts.remote import wire
from experts.remote.call import Answers, PendingCall, RemoteExpertsCall
from experts.remote.checkpoint import CHECKPOINT_FILE, load_messages
from experts.remote.coordinator import Coordinator, Key
from experts.remote.moves import move_remote_expert, placed_links
from experts.remote.settings import autocast_meta, settings_meta
from experts.remote.wire import Kind, Message, expert_state_from, expert_state_message, named_message
from experts.rows import ComputeSettings, RowBuckets
from router.plan import DispatchPlan

log = logging.getLogger(__name__)


class RemotePool(ExpertPool):
    """Experts hosted by workers; one request per expert per call, all in flight at once.

    Failures are reported per expert in `last_failures` / `failure_counts` (see `ExpertPool`); an
    expert that fails is masked for that call by the layer, and sits out calls per the back-off.
    """

    repeatable_backward = True  # an `input_only` BACKWARD leaves the worker's forward and gradients be

    def __init__(
        self,
        coordinator: Coordinator,
        layer_name: str,
        experts: list[nn.Module],
        optimizer: OptimizerSettings,
        hosts: list[str],  # the worker that hosts (owns) each expert
        policy: FaultPolicy,
        *,
        network: NetworkConfig | None = None,
        seed: int = 0,
        checkpoint_every: int = 0,
        compute: ComputeSettings | None = None,
        links: list[LinkSpec] | None = None,
    ):
        """Each expert's owner trains it with `optimizer` and computes its rows as `compute` says (an
        `ExpertsConfig` is both). `seed` is the run's: the links of the simulated `network` draw from
        it (`link_stream`); `links` (a market placement) replace the network's, one per expert."""
        self.coordinator = coordinator
        self.layer_name = layer_name
        self.num_experts = len(experts)
        self.hosts = hosts
        self.policy = policy
        self.optimizer = optimizer
        self.compute = compute or ComputeSettings()
        RowBuckets.parse(self.compute.row_buckets)  # a bad spec fails here, not in every worker
        self.specs = [expert_spec(module, e) for e, module in enumerate(experts)]
        self.initial = [{k: v.detach().cpu().clone() for k, v in m.state_dict().items()} for m in experts]
        self.links, self.link_streams, self.base_streams = placed_links(
            network, seed, layer_name, hosts, links
        )
        self.checkpoint_every = checkpoint_every
        self.memory = FailureMemory(self.num_experts, policy.backoff_base, policy.backoff_max)
        self.reply_times = ReplyTimes(self.num_experts, policy.latency_ema)
        self.calls = itertools.count(1)
        self.rounds = 0
        self.steps = 0
        self.last_failures: dict[int, str] = {}
        self.failure_counts: Counter = Counter()
        self.touched: set[int] = set()  # called with no tokens in a backward since the last step
        self.behaviours, self.behaviour_seed = {}, 0
        self.anchor = torch.zeros((), requires_grad=True)  # keeps the call in the graph for param grads
        self.published: list[dict] = [{} for _ in experts]  # version -> sketch (None: acked without one)
        self.sketch_sizes = [  # what a well-formed commitment of each expert holds
            len(param_sketch_P({name: p.detach() for name, p in module.named_parameters()}))
            for module in experts
        ]
        self.last_call_id = 0
        self.known_versions = [0] * len(experts)  # each owner's latest version, from replies and acks
        self.layer = coordinator.attach(self)
        self.host_all()

    def host_message(self, expert: int, restore: bool, params: dict | None = None) -> Message:
        """HOST for `expert` with its initial parameters (or `params`)."""
        meta = {
            "layer_name": self.layer_name,
            "spec": self.specs[expert],
            "optim": settings_meta(OptimizerSettings, self.optimizer),
            "compute": settings_meta(ComputeSettings, self.compute),
            "link": asdict(self.links[expert]),
            "link_stream": self.link_streams[expert],
            "restore": restore,
            "audit_window": self.audit_window,
        }
        key = {"step": next(self.coordinator.request_ids), "layer": self.layer, "expert": expert}
        tensors = self.initial[expert] if params is None else params
        return named_message(Kind.HOST, tensors, meta=meta, **key)

    def host_all(self) -> None:
        requests = {}
        for e in range(self.num_experts):
            message = self.host_message(e, restore=False)
            requests[(message.step, self.layer, e)] = (self.hosts[e], message)
        for (_, _, e), result in self.coordinator.request(requests, Kind.HOSTED).items():
            if isinstance(result, str):
                self.record_failures({e: f"host: {result}"})
                log.warning(
                    "expert %s/%d could not be hosted on %s: %s", self.layer_name, e, self.hosts[e], result
                )

    def move_expert(self, expert: int, link: LinkSpec, host: str | None) -> None:
        """Re-host `expert` on worker `host` behind `link`, carrying its parameters and optimizer state
        (see `experts.remote.moves`)."""
        move_remote_expert(self, expert, link, host)

    def rehost_on(self, worker: str) -> None:
        """A worker rejoined: send it its experts again; it restores them from its own checkpoint."""
        for e, host in enumerate(self.hosts):
            if host == worker:
                self.coordinator.send(worker, self.host_message(e, restore=True))
                self.memory.succeeded(e)

    def on_ack(self, worker: str, message: Message) -> None:
        if message.kind == Kind.STEPPED:
            self.publish(message.expert, message.meta)
        if message.kind == Kind.STEPPED and message.meta.get("skipped"):
            self.record_failures({message.expert: f"step: {message.meta['skipped']}"}, replace=False)
        elif message.kind == Kind.HOSTED:
            log.info("expert %s/%d back on %s (restored from its checkpoint: %s)",
                     self.layer_name, message.expert, worker, message.meta.get("restored"))  # fmt: skip

    def record_failures(self, failures: dict[int, str], replace: bool = True) -> None:
        if replace:
            self.last_failures = dict(failures)
        else:
            self.last_failures.update(failures)
        self.failure_counts.update(failures.items())

    # --- forward and backward ----------------------------------------------------------------------

    def forward(self, x_AD: torch.Tensor, plan: DispatchPlan, step: int = 0) -> PoolOutput:
        if torch.is_grad_enabled():
            y_AD, answered_E = RemoteExpertsCall.apply(self, plan, x_AD, self.anchor, step)
        else:
            y_AD, answered_E, _ = self.forward_call(x_AD, plan, step, keep=False, grad_input=False)
        return PoolOutput(y_AD, answered_E)

    def forward_call(
        self, x_AD: torch.Tensor, plan: DispatchPlan, step: int, *, keep: bool, grad_input: bool
    ):
        """One round: every expert with tokens gets its slice; returns (y_AD, answered_E, PendingCall)."""
        counts_E, token_idx_A, x_host_AD = wire.host_copies(plan.counts, plan.token_idx, x_AD)
        call = PendingCall(next(self.calls), counts_E.tolist(), [], grad_input)
        self.rounds += 1
        self.coordinator.drain()
        failures = self.unavailable(call.sizes)
        asked = [e for e, size in enumerate(call.sizes) if size and e not in failures]
        x_slices = x_host_AD.split(call.sizes)
        dtype, dtypes = answer_dtype(x_AD), expected_dtypes(x_AD)
        # the owners compute in the precision the trainer's own experts would (autocast or not)
        call_meta = {"keep": keep, "grad_input": grad_input, "step": step, **autocast_meta(x_AD.device)}
        start, clock = time.monotonic(), ReplyClock()
        round_ = Round(token_idx_A, call.sizes, asked, plan.num_tokens, self.policy, start, self.reply_time_E)
        pending, answers = {}, Answers(x_slices, dtype)
        versions = [-1 if e in failures else v for e, v in enumerate(self.known_versions)]
        for e in asked:
            meta = {**call_meta, **self.behaviour_meta(e)}
            message = Message(Kind.FORWARD, call.id, self.layer, e, meta=meta, tensors=[x_slices[e]])
            if self.coordinator.send(self.hosts[e], message):
                clock.sent(e)
                pending[(call.id, self.layer, e)] = self.hosts[e]
            else:
                failures[e] = "unreachable"
                round_.fail(e, time.monotonic())

        def on_reply(key: Key, message: Message) -> None:
            e = key[2]
            clock.replied(e)
            y_aD = message.tensors[0] if len(message.tensors) == 1 else torch.empty(0)
            reason = invalid_outputs([y_aD], [x_slices[e]], self.policy.max_output_norm, dtypes).get(0)
            if reason is None:
                answers.put(e, y_aD)
                version = message.meta.get("version", -1)
                versions[e] = version if isinstance(version, int) and not isinstance(version, bool) else -1
                self.known_versions[e] = versions[e]
                round_.answer(e, time.monotonic())
            else:
                on_fail(key, reason)

        def on_fail(key: Key, reason: str) -> None:
            failures[key[2]] = reason
            clock.failed(key[2], reason)
            round_.fail(key[2], time.monotonic())

        self.coordinator.collect(pending, Kind.OUTPUT, lambda: round_.deadline, on_reply, on_fail)
        failures |= round_.expire()
        clock.gave_up(failures, at=round_.deadline)
        self.observe_reply_times(clock.waited_s, clock.unanswered, training=keep)
        self.remember(asked, failures)
        self.record_failures(failures)
        call.answered = sorted(answers.given)
        for e in failures:
            versions[e] = -1
        y_AD = answers.gathered()
        answered_E = torch.ones(self.num_experts, dtype=torch.bool)
        answered_E[list(failures)] = False
        y_AD = y_AD.to(x_AD.device)
        if keep and self.records_calls:
            self.keep_call(step, call.sizes, versions, x_AD, y_AD)
            self.last_call_id = call.id
        return y_AD, answered_E.to(x_AD.device), call

    def behaviour_meta(self, expert: int) -> dict:
        """What the owner needs to simulate its behaviour (see experts/behaviours.py); empty if honest."""
        behaviour = self.behaviours.get(expert, HONEST)
        return {} if behaviour == HONEST else {"behaviour": behaviour.spec, "seed": self.behaviour_seed}

    def unavailable(self, sizes: list[int]) -> dict[int, str]:
        """Experts with tokens that are not asked this round: their worker is dead, or they back off."""
        failures = {}
        for e, size in enumerate(sizes):
            if not size:
                continue
            if not self.coordinator.is_alive(self.hosts[e]):
                failures[e] = "dead"
            elif self.memory.skipping(e, self.rounds):
                failures[e] = "backoff"
        return failures

    def remember(self, asked: list[int], failures: dict[int, str]) -> None:
        for e in asked:
            if e in failures:
                self.memory.failed(e, self.rounds)
            else:
                self.memory.succeeded(e)

    def backward_call(
        self, call: PendingCall, grad_y_AD: torch.Tensor, device: torch.device, dtype: torch.dtype
    ):
        """Send each expert that answered its grad_out slice; returns grad_x_AD (zeros where none came).

        Inside `only_input_gradients()` (read now, as backward runs) the owners only return input
        gradients and keep the forward for the training backward; as `LocalPool`'s `autograd.grad`,
        this touches no parameter gradient and no failure record, back-off or step bookkeeping."""
        input_only = self._input_gradients_only
        if input_only and not call.grad_input:
            return None  # nothing is asked of the owners: their parameters are not ours to touch here
        if not input_only:
            # In-process, an expert called with no tokens still gets zero gradients (and AdamW steps its
            # momentum); its owner is told to do the same at `step`, rather than sent an empty call.
            self.touched.update(e for e, size in enumerate(call.sizes) if size == 0)
        if not input_only and call.id == self.last_call_id:
            self.keep_output_gradient(grad_y_AD)
        (grad_host_AD,) = wire.host_copies(grad_y_AD)
        grad_slices = grad_host_AD.contiguous().split(call.sizes)
        pending, failures = {}, {}
        grads = Answers(grad_slices, grad_host_AD.dtype) if call.grad_input else None
        meta = {"input_only": True} if input_only else {}
        for e in call.answered:
            message = Message(Kind.BACKWARD, call.id, self.layer, e, meta=meta, tensors=[grad_slices[e]])
            if self.coordinator.send(self.hosts[e], message):
                pending[(call.id, self.layer, e)] = self.hosts[e]
            else:
                failures[e] = "backward: unreachable"

        def on_reply(key: Key, message: Message) -> None:
            e = key[2]
            if not call.grad_input:
                return
            grad = message.tensors[0] if len(message.tensors) == 1 else None
            if grad is None or grad.shape != grad_slices[e].shape or not bool(all_finite(grad)):
                failures[e] = "backward: invalid input gradient"
            else:
                grads.put(e, grad)

        def on_fail(key: Key, reason: str) -> None:
            failures[key[2]] = f"backward: {reason}"

        deadline = time.monotonic() + self.policy.backward_timeout
        self.coordinator.collect(pending, Kind.GRAD_INPUT, lambda: deadline, on_reply, on_fail)
        failures |= {key[2]: "backward: timeout" for key in pending}
        if input_only:
            if failures:
                log.debug("input-only backward of %s: no input gradient from %s", self.layer_name, failures)
        else:
            for e in failures:
                self.memory.failed(e, self.rounds)
            self.record_failures(failures, replace=False)
        if not call.grad_input:
            return None
        grad_x_AD = grads.gathered()
        return grad_x_AD.to(device, dtype)

    # --- owner steps, state, mode ------------------------------------------------------------------

    def step(self, training_step: int) -> None:
        """Every owner clips, steps and zeroes its expert; acks come back asynchronously."""
        self.steps += 1
        self.coordinator.drain()
        for e, host in enumerate(self.hosts):
            if self.coordinator.is_alive(host):
                learns = self.behaviours.get(e, HONEST).learns_at(training_step)
                meta = {"zero_missing_grads": e in self.touched, "learns": learns}
                self.coordinator.send(host, Message(Kind.STEP, self.steps, self.layer, e, meta=meta))
        self.touched.clear()
        if self.checkpoint_every and self.steps % self.checkpoint_every == 0 and self.is_last_layer():
            self.coordinator.checkpoint_workers(sorted(set(self.coordinator.registered_names())), wait=False)

    def is_last_layer(self) -> bool:
        """Periodic checkpoints are triggered after the last layer's step, so all layers are stepped."""
        return self.layer == max(self.coordinator.pools)

    # --- audits ------------------------------------------------------------------------------------

    def enable_audits(self, window: int) -> None:
        self.audit_window = window
        for e, host in enumerate(self.hosts):
            self.coordinator.send(host, Message(Kind.KEEP_STATES, 0, self.layer, e, meta={"window": window}))

    def publish(self, expert: int, meta: dict) -> None:
        """Keep a STEPPED ack's commitment (the last `audit_window` + 1), or that it named none (audited: fails)."""
        version, commitment = meta.get("version"), meta.get("commitment")
        if not isinstance(version, int) or isinstance(version, bool):
            return
        self.known_versions[expert] = version
        if well_formed_sketch(commitment, self.sketch_sizes[expert]):
            self.published[expert][version] = torch.tensor(commitment)
        elif self.audit_window:
            self.published[expert][version] = None  # announced without a commitment
        oldest, published = version - self.audit_window, self.published[expert]
        self.published[expert] = {v: published[v] for v in published if v >= oldest}

    def published_commitment(self, expert: int, version: int) -> torch.Tensor | None:
        self.coordinator.drain()  # STEPPED acks that arrived since the last call
        return self.published[expert].get(version)

    def missing_commitment(self, expert: int, version: int) -> bool:
        self.coordinator.drain()
        return version in self.published[expert] and self.published[expert][version] is None

    def audit(self, expert: int, version: int, timeout: float) -> AuditAnswer:
        key = (next(self.coordinator.request_ids), self.layer, expert)
        message = Message(Kind.AUDIT, *key, meta={"version": version})
        requests = {key: (self.hosts[expert], message)}
        result = self.coordinator.request(requests, Kind.AUDIT_STATE, timeout)[key]
        if isinstance(result, str):
            raise AuditRefused(result)
        state = self.checked_state(expert, result)
        next_version, next_sketch = result.meta.get("next_version"), result.meta.get("next_sketch")
        if state is None or result.meta.get("version") != version:
            raise AuditRefused(f"the owner answered the audit of version {version} with a malformed state")
        if not (next_version is None or isinstance(next_version, int)) or not (
            next_sketch is None or well_formed_sketch(next_sketch, self.sketch_sizes[expert])
        ):
            raise AuditRefused("the owner answered the audit with a malformed next commitment")
        params, optimizer_state = state
        owner_state = OwnerState(version, params, optimizer_state, param_sketch_P(params))
        sketch = None if next_sketch is None else torch.tensor(next_sketch, dtype=torch.float64)
        return AuditAnswer(owner_state, next_version, sketch)

    def expert_replica(self, expert: int) -> tuple[nn.Module, OptimizerSettings]:
        return build_expert(self.specs[expert]), self.optimizer

    def state_dict(self) -> dict:
        """Parameters and optimizer state of every expert, fetched from its owner, in `LocalPool`'s
        layout (checkpoints move between transports). An owner that cannot be reached contributes
        its own last checkpoint when this trainer started it (and so knows its state dir); otherwise
        its experts are None and listed under `missing`: the checkpoint is incomplete, never made up."""
        requests = {}
        for e, host in enumerate(self.hosts):
            key = (next(self.coordinator.request_ids), self.layer, e)
            requests[key] = (host, Message(Kind.GET_STATE, *key))
        states: dict[int, tuple[dict, dict]] = {}
        for (_, _, e), result in self.coordinator.request(requests, Kind.STATE).items():
            state = self.checked_state(e, result) if not isinstance(result, str) else None
            if state is None:
                state = self.owner_checkpoint(e)
                log.warning("state of expert %s/%d unavailable (%s); %s", self.layer_name, e, result,
                            "taken from its owner's own last checkpoint" if state else "it is missing")  # fmt: skip
            if state is not None:
                states[e] = state
        self.coordinator.checkpoint_workers(sorted(set(self.hosts)), wait=True)
        experts = [states[e][0] if e in states else None for e in range(self.num_experts)]
        optimizers = [states[e][1] if e in states else None for e in range(self.num_experts)]
        missing = [e for e in range(self.num_experts) if e not in states]
        return {
            "experts": experts,
            "optimizers": optimizers,
            "missing": missing,
            **self.reply_times.state_dict(),
        }

    def checked_state(self, expert: int, message: Message) -> tuple[dict, dict] | None:
        """(parameters, optimizer state) from a STATE message, or None when its parameters are not
        named, shaped and typed like the expert's (a broken or hostile owner)."""
        try:
            params, optimizer_state = expert_state_from(message)
        except WireError as err:
            log.warning("expert %s/%d sent a malformed state: %s", self.layer_name, expert, err)
            return None
        initial = self.initial[expert]
        if set(params) != set(initial) or any(
            (params[k].shape, params[k].dtype) != (v.shape, v.dtype) for k, v in initial.items()
        ):
            log.warning("expert %s/%d sent parameters of another shape; ignored", self.layer_name, expert)
            return None
        return {k: v.clone() for k, v in params.items()}, optimizer_state

    def owner_checkpoint(self, expert: int) -> tuple[dict, dict] | None:
        """The expert's state in its owner's own checkpoint file, when we know where that is."""
        state_dir = self.coordinator.workers[self.hosts[expert]].state_dir
        path = state_dir / CHECKPOINT_FILE if state_dir is not None else None
        if path is None or not path.exists():
            return None
        try:
            saved = load_messages(path)
        except CheckpointError as err:
            log.warning("%s", err)
            return None
        for message in saved:
            mine = (message.meta.get("layer_name"), message.expert) == (self.layer_name, expert)
            if mine and message.meta.get("spec") == self.specs[expert]:
                return self.checked_state(expert, message)
        return None

    def load_state_dict(self, state: dict) -> None:
        """Send every expert its state; a missing one (None, from an incomplete checkpoint) keeps the
        parameters it was hosted with. Owners then checkpoint themselves, so their own files match."""
        self.load_reply_times(state)
        requests = {}
        pairs = zip(state["experts"], state["optimizers"], strict=True)
        for e, (params, optimizer_state) in enumerate(pairs):
            if params is None:
                log.warning("expert %s/%d is missing from the checkpoint; it starts from its initial weights",
                            self.layer_name, e)  # fmt: skip
                continue
            key = (next(self.coordinator.request_ids), self.layer, e)
            message = expert_state_message(
                Kind.LOAD_STATE, params, optimizer_state, step=key[0], layer=self.layer, expert=e
            )
            requests[key] = (self.hosts[e], message)
        for (_, _, e), result in self.coordinator.request(requests, Kind.LOADED).items():
            if isinstance(result, str):
                log.warning("expert %s/%d did not load its state: %s", self.layer_name, e, result)
        self.coordinator.checkpoint_workers(sorted(set(self.hosts)), wait=True)

    def train(self, mode: bool = True) -> None:
        for host in sorted(set(self.hosts)):
            self.coordinator.send(host, Message(Kind.TRAIN_MODE, layer=self.layer, meta={"mode": mode}))
