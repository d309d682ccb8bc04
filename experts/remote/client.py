"""`transport=process`: experts live in worker processes ("miners") that own them; the trainer keeps
only the trunk and the routers. Importing this module registers the transport as "process".

Trainer side:
- `Coordinator`: the ROUTER socket workers connect to (`ipc://` or `tcp://`), the registry of live
  workers (HELLO, heartbeats, process exits), where each expert lives, and re-hosting on rejoin.
- `RemotePool`: an `ExpertPool` that sends one request per expert per call with every token routed
  to it, all in flight at once, and applies the `FaultPolicy` (timeouts, k_min, straggler cut-off,
  output validation, back-off). Autograd runs through the call (`RemoteExpertsCall`): backward sends
  each expert its slice of grad_out and receives grad_in; the worker kept its forward graph. While
  the pool is inside `only_input_gradients()` (PoI's extra backwards), BACKWARD says `input_only`: the
  worker returns grad_in only, keeping its forward and its parameter gradients as they were.
- `ProcessTransport`: spawns `workers` local workers, makes a pool per MoE layer, tears all down.

Threading: none of our own. The coordinator runs in the trainer's thread and reads its socket only
inside pool calls; ZeroMQ's I/O thread queues whatever arrives in between. A worker counts as dead
when its process exited, its connection is gone, or nothing came from it for
`heartbeat_interval * heartbeat_misses` seconds; it is alive again when it speaks (or re-registers).

Legend: A assignments sorted by expert, a rows of one expert, D model width, E experts.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import zmq
from torch import nn

from experts.behaviours import HONEST
from experts.errors import ConfigError, WireError
from experts.modules import FFN, ExpertsConfig
from experts.network import (
    FailureMemory,
    FaultPolicy,
    NetworkConfig,
    Round,
    fault_policy,
    link_for,
    network_is_ideal,
)
from experts.pool import ExpertPool, PoolOutput, all_finite, invalid_outputs, make_optimizer
from experts.remote.wire import (
    Kind,
    Message,
    WireLimits,
    decode,
    encode,
    expert_state_from,
    expert_state_message,
    named_message,
)
from experts.transport import LocalTransportConfig, Transport, register_transport
from router.plan import DispatchPlan

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
LIVENESS_TICK_S = 0.05  # longest wait on the socket before checking whether a worker died
SHUTDOWN_LINGER_MS = 500  # how long closing may wait to deliver SHUTDOWN to the workers


@dataclass
class ProcessTransportConfig(LocalTransportConfig):
    """Workers and addresses of `transport=process`; the fault semantics and the simulated network
    come from `LocalTransportConfig` (see `FaultPolicy`) and mean the same in both transports."""

    name: str = "process"
    workers: int = 2  # worker processes the trainer spawns on this machine
    external_workers: int = 0  # workers started by hand (python -m experts.worker) to wait for
    address: str = "ipc"  # ipc (one host) | tcp (across hosts)
    host: str = "127.0.0.1"  # tcp: interface to bind; 0.0.0.0 accepts workers from other hosts
    port: int = 0  # tcp: port to bind; 0 picks a free one (logged)
    threads: int = 1  # torch intra-op threads per worker
    devices: list[str] | None = None  # device per spawned worker; None: cuda:i round-robin, else cpu
    max_grad_norm: float = 1e4  # workers reject grad_out with a larger L2 norm; 0 disables
    heartbeat_interval: float = 1.0  # seconds between worker heartbeats
    heartbeat_misses: int = 5  # silent intervals before a worker counts as dead
    register_timeout: float = 60.0  # seconds to wait for workers to start and register
    request_timeout: float = 60.0  # seconds for hosting, state and checkpoint requests
    cache_size: int = 256  # forward graphs a worker keeps for backward (oldest evicted)
    max_frame_mb: float = 1024.0  # largest tensor frame either side accepts
    checkpoint_every: int = 0  # workers checkpoint themselves every N steps; 0: at trainer checkpoints


def expert_spec(module: nn.Module, index: int) -> dict:
    """What a worker needs to build the same module (its parameters come separately)."""
    if type(module) is not FFN:
        raise ConfigError(f"transport=process hosts FFN experts; expert {index} is a {type(module).__name__}")
    return {
        "kind": "ffn",
        "d_model": module.w_in.in_features,
        "d_ff": module.w_out.in_features,
        "activation": module.activation,
    }


# --- coordinator -------------------------------------------------------------------------------------


REQUEST_OF = {
    Kind.OUTPUT: Kind.FORWARD,
    Kind.GRAD_INPUT: Kind.BACKWARD,
    Kind.HOSTED: Kind.HOST,
    Kind.STATE: Kind.GET_STATE,
    Kind.LOADED: Kind.LOAD_STATE,
    Kind.CHECKPOINTED: Kind.CHECKPOINT,
    Kind.ECHOED: Kind.ECHO,
}


def answers(message: Message, reply_kind: Kind) -> bool:
    """Whether `message` is the reply, or the ERROR, to a request answered by `reply_kind`."""
    if message.kind == Kind.ERROR:
        return message.meta.get("request") in (None, REQUEST_OF[reply_kind].name)
    return message.kind == reply_kind


@dataclass
class WorkerRecord:
    name: str
    identity: bytes | None = None
    process: subprocess.Popen | None = None
    pid: int | None = None
    device: str = "?"
    last_seen: float = 0.0
    alive: bool = False
    exited: bool = False
    dirty: bool = False  # its experts changed since its last checkpoint
    stats: dict = field(default_factory=dict)


Key = tuple[int, int, int]  # (step or call, layer, expert)


class Coordinator:
    """The registry of workers and the one socket the trainer talks to them through."""

    def __init__(self, cfg: ProcessTransportConfig, run_dir: Path | None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.heartbeat_timeout = cfg.heartbeat_interval * cfg.heartbeat_misses
        self.limits = WireLimits(max_tensor_bytes=int(cfg.max_frame_mb * 2**20))
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished worker fails at once
        self.socket.setsockopt(zmq.SNDHWM, 64)
        self.socket.setsockopt(zmq.MAXMSGSIZE, self.limits.max_tensor_bytes + 4096)
        self.address, self.connect_address, self.ipc_path = self._bind(cfg)
        self.workers: dict[str, WorkerRecord] = {}
        self.names_by_identity: dict[bytes, str] = {}
        self.pools: dict[int, RemotePool] = {}
        self.rejected: Counter = Counter()  # malformed frames received, by first word of the reason
        self.stray: Counter = Counter()  # replies nobody waits for any more (late, duplicate, foreign)
        self.request_ids = itertools.count(1)
        log.info("coordinator listening on %s", self.address)

    def _bind(self, cfg) -> tuple[str, str, Path | None]:
        if cfg.address == "ipc":
            path = Path(tempfile.gettempdir()) / f"poimoe-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
            address = f"ipc://{path}"
            self.socket.bind(address)
            return address, address, path
        if cfg.address == "tcp":
            if cfg.port:
                self.socket.bind(f"tcp://{cfg.host}:{cfg.port}")
                port = cfg.port
            else:
                port = self.socket.bind_to_random_port(f"tcp://{cfg.host}")
            local_host = "127.0.0.1" if cfg.host in ("0.0.0.0", "*") else cfg.host
            return f"tcp://{cfg.host}:{port}", f"tcp://{local_host}:{port}", None
        raise ConfigError(f"transport.address={cfg.address!r}; valid: ipc, tcp")

    # --- sending and receiving ---------------------------------------------------------------------

    def send(self, name: str, message: Message) -> bool:
        """Queue `message` for worker `name`; False (and the worker marked dead if gone) when it cannot."""
        record = self.workers.get(name)
        if record is None or not record.alive or record.identity is None:
            return False
        try:
            self.socket.send_multipart([record.identity, *encode(message)], copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:  # its queue is full: it has stopped reading
            return False
        except zmq.ZMQError as err:
            if err.errno == zmq.EHOSTUNREACH:
                self.mark_dead(record, "disconnected")
                return False
            raise
        if message.kind in (Kind.STEP, Kind.LOAD_STATE, Kind.HOST):
            record.dirty = True
        return True

    def receive(self, timeout_s: float) -> list[tuple[str, Message]]:
        """Replies that arrived within `timeout_s`; registrations, heartbeats and malformed frames are
        handled here and not returned."""
        replies = []
        if not self.socket.poll(max(0, int(timeout_s * 1000)), zmq.POLLIN):
            return replies
        while True:
            try:
                parts = self.socket.recv_multipart(copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                return replies
            envelope = self._accept(parts)
            if envelope is not None:
                replies.append(envelope)

    def drain(self) -> None:
        for name, message in self.receive(0):
            self.handle_stray(name, message)

    def _accept(self, parts: list) -> tuple[str, Message] | None:
        identity = parts[0].bytes
        try:
            message = decode(parts[1:], self.limits)
        except WireError as err:
            self.rejected[str(err).split(" ")[0]] += 1
            log.warning("rejected frame from %r: %s", identity[:16], err)
            return None
        if message.kind == Kind.HELLO:
            self.register(identity, message.meta)
            return None
        name = self.names_by_identity.get(identity)
        if name is None:  # a worker registered with an earlier coordinator: ask it to register here
            self._send_raw(identity, Message(Kind.REGISTER_AGAIN))
            return None
        record = self.workers[name]
        record.last_seen = time.monotonic()
        if not record.alive and not record.exited:
            log.info("worker %s is responsive again", name)
            record.alive = True
        if message.kind == Kind.HEARTBEAT:
            record.stats = message.meta
            return None
        return name, message

    def _send_raw(self, identity: bytes, message: Message) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.socket.send_multipart([identity, *encode(message)], copy=False, flags=zmq.NOBLOCK)

    def collect(
        self,
        pending: dict[Key, str],
        reply_kind: Kind,
        until: Callable[[], float],
        on_reply: Callable[[Key, Message], None],
        on_fail: Callable[[Key, str], None],
    ) -> None:
        """Read until every key in `pending` is answered or failed, or `until()` passes. A reply counts
        only from the worker the request went to; ERROR replies and dead workers go to `on_fail`."""
        while pending:
            now = time.monotonic()
            if now >= until():
                return
            for name, message in self.receive(min(until() - now, LIVENESS_TICK_S)):
                key = (message.step, message.layer, message.expert)
                if pending.get(key) != name or not answers(message, reply_kind):
                    self.handle_stray(name, message)
                    continue
                del pending[key]
                if message.kind == Kind.ERROR:
                    reason = str(message.meta.get("reason", "?"))
                    on_fail(key, reason if reason.startswith("behaviour:") else f"error: {reason}")
                else:
                    on_reply(key, message)
            # judged only after reading: heartbeats queued while the trainer was busy count as heard
            for key, name in list(pending.items()):
                if not self.is_alive(name):
                    del pending[key]
                    on_fail(key, "dead")

    def request(
        self, requests: dict[Key, tuple[str, Message]], reply_kind: Kind, timeout: float | None = None
    ) -> dict[Key, Message | str]:
        """Send each request, wait for all replies; a key maps to its reply or to why it failed."""
        results: dict[Key, Message | str] = {}
        pending = {}
        for key, (name, message) in requests.items():
            if self.send(name, message):
                pending[key] = name
            else:
                results[key] = "unreachable"
        deadline = time.monotonic() + (self.cfg.request_timeout if timeout is None else timeout)
        self.collect(pending, reply_kind, lambda: deadline, results.__setitem__, results.__setitem__)
        results.update(dict.fromkeys(pending, "timeout"))
        return results

    def handle_stray(self, name: str, message: Message) -> None:
        """Asynchronous acks go to their pool; anything else is late or unexpected and only counted."""
        pool = self.pools.get(message.layer)
        if pool is not None and message.kind in (Kind.STEPPED, Kind.HOSTED):
            pool.on_ack(name, message)
            return
        self.stray[message.kind.name] += 1
        if message.kind == Kind.ERROR:
            log.warning("worker %s: %s", name, message.meta.get("reason"))

    # --- registry ----------------------------------------------------------------------------------

    def expect(self, name: str, process: subprocess.Popen | None) -> None:
        self.workers[name] = WorkerRecord(name=name, process=process, pid=process.pid if process else None)

    def register(self, identity: bytes, meta: dict) -> None:
        name = str(meta.get("name", ""))[:128]
        if not name:
            self.rejected["hello"] += 1
            return
        record = self.workers.get(name)
        rejoining = record is not None and record.identity is not None and record.identity != identity
        if record is None:
            record = self.workers[name] = WorkerRecord(name=name)
        if rejoining:
            self.names_by_identity.pop(record.identity, None)
            if record.process is not None and record.process.pid != meta.get("pid"):
                record.process = None  # restarted by someone else: no longer ours to watch
        record.identity, record.pid, record.device = identity, meta.get("pid"), str(meta.get("device", "?"))
        record.alive, record.exited, record.last_seen = True, False, time.monotonic()
        self.names_by_identity[identity] = name
        welcome = {
            "heartbeat_interval": self.cfg.heartbeat_interval,
            "cache_size": self.cfg.cache_size,
            "max_grad_norm": self.cfg.max_grad_norm,
            "checkpoint_dir": str(self.run_dir / "workers" / name) if self.run_dir is not None else None,
        }
        self.send(name, Message(Kind.WELCOME, meta=welcome))
        log.info(
            "worker %s %s (pid %s, %s)",
            name,
            "rejoined" if rejoining else "registered",
            record.pid,
            record.device,
        )
        if rejoining:
            for pool in self.pools.values():
                pool.rehost_on(name)

    def is_alive(self, name: str) -> bool:
        """Whether `name` is registered, running and heard from lately. Call it after reading the
        socket (`drain`, `receive`): silence is judged by what has been read, not what is queued."""
        record = self.workers.get(name)
        if record is None or not record.alive:
            return False
        if record.process is not None and record.process.poll() is not None:
            self.mark_dead(record, f"exited with code {record.process.returncode}", exited=True)
            return False
        if time.monotonic() - record.last_seen > self.heartbeat_timeout:
            self.mark_dead(record, f"silent for more than {self.heartbeat_timeout:.1f}s")
            return False
        return True

    def mark_dead(self, record: WorkerRecord, why: str, exited: bool = False) -> None:
        if record.alive:
            log.warning("worker %s is dead: %s", record.name, why)
        record.alive = False
        record.exited = record.exited or exited

    def registered_names(self) -> list[str]:
        return [name for name, record in self.workers.items() if record.identity is not None]

    def wait_for_workers(self, names: list[str], extra: int, timeout: float) -> None:
        """Block until the named workers and `extra` others have registered; fail fast if one exits."""
        deadline = time.monotonic() + timeout
        while True:
            self.drain()
            missing = [n for n in names if self.workers[n].identity is None]
            others = len([n for n in self.registered_names() if n not in names])
            if not missing and others >= extra:
                return
            for name in missing:
                process = self.workers[name].process
                if process is not None and process.poll() is not None:
                    raise RuntimeError(
                        f"worker {name} exited with code {process.returncode} before registering"
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"workers did not register within {timeout:.0f}s: missing {missing}, "
                    f"{others}/{extra} external; start them with python -m experts.worker --coordinator {self.address}"
                )
            self.socket.poll(int(LIVENESS_TICK_S * 1000), zmq.POLLIN)

    def checkpoint_workers(self, names: list[str], wait: bool) -> None:
        """Ask workers whose experts changed to write their own checkpoint."""
        self.drain()
        requests = {}
        for name in names:
            record = self.workers.get(name)
            if record is not None and record.dirty and self.is_alive(name):
                key = (next(self.request_ids), 0, 0)
                requests[key] = (name, Message(Kind.CHECKPOINT, key[0]))
                record.dirty = False
        if not wait:
            for name, message in requests.values():
                self.send(name, message)
            return
        for key, result in self.request(requests, Kind.CHECKPOINTED).items():
            if isinstance(result, str):
                log.warning("worker %s did not checkpoint: %s", requests[key][0], result)

    def close(self) -> None:
        for name, record in self.workers.items():
            if record.alive:
                self.send(name, Message(Kind.SHUTDOWN))
        self.socket.close(linger=SHUTDOWN_LINGER_MS)  # let the SHUTDOWNs out, but never wait long
        self.context.term()
        if self.ipc_path is not None:
            self.ipc_path.unlink(missing_ok=True)


# --- the pool ----------------------------------------------------------------------------------------


@dataclass
class Call:
    """One forward call, remembered for its backward."""

    id: int
    sizes: list[int]
    answered: list[int]  # experts with tokens whose output was accepted
    grad_input: bool


class RemoteExpertsCall(torch.autograd.Function):
    """Autograd through a remote call: forward sends x slices, backward sends grad_out slices."""

    @staticmethod
    def forward(ctx, pool: RemotePool, plan: DispatchPlan, x_AD: torch.Tensor, anchor: torch.Tensor, step: int):
        grad_input = ctx.needs_input_grad[2]
        y_AD, answered_E, call = pool.forward_call(x_AD, plan, step, keep=True, grad_input=grad_input)
        ctx.pool, ctx.call, ctx.x_meta = pool, call, (x_AD.device, x_AD.dtype)
        ctx.mark_non_differentiable(answered_E)
        return y_AD, answered_E

    @staticmethod
    def backward(ctx, grad_y_AD: torch.Tensor, _grad_answered):
        grad_x_AD = ctx.pool.backward_call(ctx.call, grad_y_AD, *ctx.x_meta)
        return None, None, grad_x_AD, None, None


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
        experts_cfg: ExpertsConfig,
        owners: list[str],
        policy: FaultPolicy,
        *,
        network: NetworkConfig | None = None,
        link_seed: str = "0",
        checkpoint_every: int = 0,
    ):
        self.coordinator = coordinator
        self.layer = len(coordinator.pools)
        self.layer_name = layer_name
        self.num_experts = len(experts)
        self.owners = owners
        self.policy = policy
        self.optim = {
            "lr": experts_cfg.lr,
            "weight_decay": experts_cfg.weight_decay,
            "grad_clip": experts_cfg.grad_clip,
        }
        self.specs = [expert_spec(module, e) for e, module in enumerate(experts)]
        self.initial = [{k: v.detach().cpu().clone() for k, v in m.state_dict().items()} for m in experts]
        self.links = [link_for(network, e) for e in range(self.num_experts)]
        self.link_seed = link_seed
        self.checkpoint_every = checkpoint_every
        self.memory = FailureMemory(self.num_experts, policy.backoff_base, policy.backoff_max)
        self.calls = itertools.count(1)
        self.rounds = 0
        self.steps = 0
        self.last_failures: dict[int, str] = {}
        self.failure_counts: Counter = Counter()
        self.known_state: list[tuple[dict, dict] | None] = [None] * self.num_experts
        self.touched: set[int] = set()  # called with no tokens in a backward since the last step
        self.behaviours, self.behaviour_seed = {}, 0
        self.anchor = torch.zeros((), requires_grad=True)  # keeps the call in the graph for param grads
        coordinator.pools[self.layer] = self
        self.host_all()

    def host_message(self, expert: int, restore: bool) -> Message:
        meta = {
            "layer_name": self.layer_name,
            "spec": self.specs[expert],
            "optim": self.optim,
            "link": asdict(self.links[expert]),
            "link_seed": self.link_seed,
            "restore": restore,
        }
        return named_message(
            Kind.HOST,
            self.initial[expert],
            meta=meta,
            step=next(self.coordinator.request_ids),
            layer=self.layer,
            expert=expert,
        )

    def host_all(self) -> None:
        requests = {}
        for e in range(self.num_experts):
            message = self.host_message(e, restore=False)
            requests[(message.step, self.layer, e)] = (self.owners[e], message)
        for (_, _, e), result in self.coordinator.request(requests, Kind.HOSTED).items():
            if isinstance(result, str):
                self.record_failures({e: f"host: {result}"})
                log.warning(
                    "expert %s/%d could not be hosted on %s: %s", self.layer_name, e, self.owners[e], result
                )

    def rehost_on(self, worker: str) -> None:
        """A worker rejoined: send it its experts again; it restores them from its own checkpoint."""
        for e, owner in enumerate(self.owners):
            if owner == worker:
                self.coordinator.send(worker, self.host_message(e, restore=True))
                self.memory.succeeded(e)

    def on_ack(self, worker: str, message: Message) -> None:
        if message.kind == Kind.STEPPED and message.meta.get("skipped"):
            self.record_failures({message.expert: f"step: {message.meta['skipped']}"}, replace=False)
        elif message.kind == Kind.HOSTED:
            log.info(
                "expert %s/%d back on %s (restored from its checkpoint: %s)",
                self.layer_name,
                message.expert,
                worker,
                message.meta.get("restored"),
            )

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

    def forward_call(self, x_AD: torch.Tensor, plan: DispatchPlan, step: int, *, keep: bool, grad_input: bool):
        """One round: every expert with tokens gets its slice; returns (y_AD, answered_E, Call)."""
        call = Call(next(self.calls), plan.split_sizes(), [], grad_input)
        self.rounds += 1
        self.coordinator.drain()
        failures = self.unavailable(call.sizes)
        asked = [e for e, size in enumerate(call.sizes) if size and e not in failures]
        x_slices = x_AD.detach().cpu().split(call.sizes)
        round_ = Round(plan.token_idx, call.sizes, asked, plan.num_tokens, self.policy, time.monotonic())
        pending, outputs = {}, {}
        for e in asked:
            meta = {
                "keep": keep,
                "grad_input": grad_input,
                "step": step,
                **self.behaviour_meta(e),
            }
            message = Message(Kind.FORWARD, call.id, self.layer, e, meta=meta, tensors=[x_slices[e]])
            if self.coordinator.send(self.owners[e], message):
                pending[(call.id, self.layer, e)] = self.owners[e]
            else:
                failures[e] = "unreachable"
                round_.fail(e, time.monotonic())

        def on_reply(key: Key, message: Message) -> None:
            e = key[2]
            y_aD = message.tensors[0] if len(message.tensors) == 1 else torch.empty(0)
            reason = invalid_outputs([y_aD], [x_slices[e]], self.policy.max_output_norm).get(0)
            if reason is None:
                outputs[e] = y_aD
                round_.answer(e, time.monotonic())
            else:
                on_fail(key, reason)

        def on_fail(key: Key, reason: str) -> None:
            failures[key[2]] = reason
            round_.fail(key[2], time.monotonic())

        self.coordinator.collect(pending, Kind.OUTPUT, lambda: round_.deadline, on_reply, on_fail)
        failures |= round_.expire()
        self.remember(asked, failures)
        self.record_failures(failures)
        call.answered = sorted(outputs)
        y_AD = torch.cat(
            [outputs.get(e, x_slice.new_zeros(x_slice.shape)) for e, x_slice in enumerate(x_slices)]
        )
        answered_E = torch.ones(self.num_experts, dtype=torch.bool)
        answered_E[list(failures)] = False
        return y_AD.to(x_AD.device, x_AD.dtype), answered_E.to(x_AD.device), call

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
            if not self.coordinator.is_alive(self.owners[e]):
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

    def backward_call(self, call: Call, grad_y_AD: torch.Tensor, device: torch.device, dtype: torch.dtype):
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
        grad_slices = grad_y_AD.detach().cpu().contiguous().split(call.sizes)
        pending, grads, failures = {}, {}, {}
        meta = {"input_only": True} if input_only else {}
        for e in call.answered:
            message = Message(Kind.BACKWARD, call.id, self.layer, e, meta=meta, tensors=[grad_slices[e]])
            if self.coordinator.send(self.owners[e], message):
                pending[(call.id, self.layer, e)] = self.owners[e]
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
                grads[e] = grad

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
        grad_x_AD = torch.cat([grads.get(e, g.new_zeros(g.shape)) for e, g in enumerate(grad_slices)])
        return grad_x_AD.to(device, dtype)

    # --- owner steps, state, mode ------------------------------------------------------------------

    def step(self, training_step: int) -> None:
        """Every owner clips, steps and zeroes its expert; acks come back asynchronously."""
        self.steps += 1
        self.coordinator.drain()
        for e, owner in enumerate(self.owners):
            if self.coordinator.is_alive(owner):
                learns = self.behaviours.get(e, HONEST).learns_at(training_step)
                meta = {"zero_missing_grads": e in self.touched, "learns": learns}
                self.coordinator.send(owner, Message(Kind.STEP, self.steps, self.layer, e, meta=meta))
        self.touched.clear()
        if self.checkpoint_every and self.steps % self.checkpoint_every == 0 and self.is_last_layer():
            self.coordinator.checkpoint_workers(sorted(set(self.coordinator.registered_names())), wait=False)

    def is_last_layer(self) -> bool:
        """Periodic checkpoints are triggered after the last layer's step, so all layers are stepped."""
        return self.layer == max(self.coordinator.pools)

    def state_dict(self) -> dict:
        """Parameters and optimizer state of every expert, fetched from its owner, in `LocalPool`'s
        layout (checkpoints move between transports). An unreachable expert contributes its last
        fetched state, or its initial one. Owners also write their own checkpoints."""
        requests = {}
        for e, owner in enumerate(self.owners):
            key = (next(self.coordinator.request_ids), self.layer, e)
            requests[key] = (owner, Message(Kind.GET_STATE, *key))
        for (_, _, e), result in self.coordinator.request(requests, Kind.STATE).items():
            if isinstance(result, str):
                log.warning(
                    "state of expert %s/%d unavailable (%s); checkpointing its last known state",
                    self.layer_name,
                    e,
                    result,
                )
                continue
            params, optimizer_state = expert_state_from(result)
            self.known_state[e] = ({k: v.clone() for k, v in params.items()}, optimizer_state)
        self.coordinator.checkpoint_workers(sorted(set(self.owners)), wait=True)
        experts, optimizers = [], []
        for e in range(self.num_experts):
            params, optimizer_state = self.known_state[e] or self.fresh_state(e)
            experts.append(params)
            optimizers.append(optimizer_state)
        return {"experts": experts, "optimizers": optimizers}

    def fresh_state(self, expert: int) -> tuple[dict, dict]:
        module = FFN(
            self.specs[expert]["d_model"], self.specs[expert]["d_ff"], self.specs[expert]["activation"]
        )
        module.load_state_dict(self.initial[expert])
        optimizer = make_optimizer(module, self.optim["lr"], self.optim["weight_decay"])
        return dict(self.initial[expert]), optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        requests = {}
        for e, (params, optimizer_state) in enumerate(
            zip(state["experts"], state["optimizers"], strict=True)
        ):
            key = (next(self.coordinator.request_ids), self.layer, e)
            message = expert_state_message(
                Kind.LOAD_STATE, params, optimizer_state, step=key[0], layer=self.layer, expert=e
            )
            requests[key] = (self.owners[e], message)
            self.known_state[e] = (dict(params), optimizer_state)
        for (_, _, e), result in self.coordinator.request(requests, Kind.LOADED).items():
            if isinstance(result, str):
                log.warning("expert %s/%d did not load its state: %s", self.layer_name, e, result)

    def train(self, mode: bool = True) -> None:
        for owner in sorted(set(self.owners)):
            self.coordinator.send(owner, Message(Kind.TRAIN_MODE, layer=self.layer, meta={"mode": mode}))


# --- the transport -----------------------------------------------------------------------------------


def worker_devices(cfg: ProcessTransportConfig) -> list[str]:
    """One device per spawned worker: as configured, else cuda:i round-robin, else the CPU."""
    if cfg.devices:
        return [cfg.devices[i % len(cfg.devices)] for i in range(cfg.workers)]
    if torch.cuda.is_available():
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(cfg.workers)]
    return ["cpu"] * cfg.workers


def spawn_worker(name: str, address: str, device: str, cfg: ProcessTransportConfig, log_dir: Path | None):
    """`python -m experts.worker` as a child that exits when this process dies."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(cfg.threads)
    command = [
        sys.executable,
        "-m",
        "experts.remote.worker",
        "--coordinator",
        address,
        "--name",
        name,
        "--device",
        device,
        "--threads",
        str(cfg.threads),
        "--parent-pid",
        str(os.getpid()),
        "--max-frame-mb",
        str(cfg.max_frame_mb),
        "--log-level",
        logging.getLevelName(log.getEffectiveLevel()),
    ]
    output = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        output = open(log_dir / "worker.log", "ab")  # noqa: SIM115 (the child holds it)
    try:
        return subprocess.Popen(
            command,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
            stdin=subprocess.DEVNULL,
        )
    finally:
        if output is not None:
            output.close()


def stop_processes(processes: list[subprocess.Popen], grace_s: float = 2.0) -> None:
    """Wait `grace_s` for workers told to shut down, then SIGTERM (after SIGCONT), then SIGKILL."""
    deadline = time.monotonic() + grace_s
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
    for sig in (signal.SIGCONT, signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in processes if p.poll() is None]
        for process in alive:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
        for process in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=1.0)


class ProcessTransport(Transport):
    """Spawns the workers, makes a `RemotePool` per MoE layer on them, and tears everything down."""

    def __init__(self, cfg: ProcessTransportConfig, *, device: torch.device, run_dir: Path | None, seed: int):
        if cfg.workers + cfg.external_workers < 1:
            raise ConfigError("transport.workers + transport.external_workers must be at least 1")
        self.cfg, self.run_dir, self.seed = cfg, Path(run_dir) if run_dir is not None else None, seed
        self.policy = fault_policy(cfg)
        network_is_ideal(cfg.network)  # fails now, not after the workers started, on a bad link spec
        self.processes: list[subprocess.Popen] = []
        self._finalizer = weakref.finalize(self, stop_processes, self.processes, 0.0)
        self.coordinator = Coordinator(cfg, self.run_dir)
        self.closed = False
        self.next_slot = 0
        try:
            names = self.spawn_workers()
            self.coordinator.wait_for_workers(names, cfg.external_workers, cfg.register_timeout)
        except BaseException:
            self.close()
            raise

    def spawn_workers(self) -> list[str]:
        names = []
        for i, device in enumerate(worker_devices(self.cfg)):
            name = f"w{i}"
            log_dir = self.run_dir / "workers" / name if self.run_dir is not None else None
            process = spawn_worker(name, self.coordinator.connect_address, device, self.cfg, log_dir)
            self.processes.append(process)
            self.coordinator.expect(name, process)
            names.append(name)
        return names

    def make_pool(self, layer: str, experts: list[nn.Module], experts_cfg: ExpertsConfig) -> RemotePool:
        """Experts go to workers round-robin, continuing across layers."""
        workers = self.coordinator.registered_names()
        owners = [workers[(self.next_slot + e) % len(workers)] for e in range(len(experts))]
        self.next_slot += len(experts)
        return RemotePool(
            self.coordinator,
            layer,
            experts,
            experts_cfg,
            owners,
            self.policy,
            network=self.cfg.network,
            link_seed=f"{self.seed}/{self.cfg.network.seed}",
            checkpoint_every=self.cfg.checkpoint_every,
        )

    @property
    def address(self) -> str:
        return self.coordinator.address

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.coordinator.close()
        stop_processes(self.processes)


register_transport("process", ProcessTransportConfig, ProcessTransport)
