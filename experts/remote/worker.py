"""The miner: a worker process that hosts experts, owns their parameters and optimizers, serves their
forward and backward over the wire, steps its own optimizers and checkpoints itself.

    python -m experts.worker --coordinator tcp://HOST:PORT --coordinator-key HEX --key PATH \
        [--state-dir DIR] [--device cuda:1] [--threads 1] [--name w1]

starts one by hand, on this host or another (`experts/worker.py` parses the command line); the
trainer spawns its local workers with the same command. A worker registers with the coordinator
(HELLO → WELCOME); the coordinator then ships it the experts it should host (HOST). A worker that
restarts under the same `--name` (and key) registers again, is sent its experts again and restores
them from its own last checkpoint (`<state dir>/experts.safetensors`, see `experts.remote.checkpoint`).
Each hosted expert is an `ExpertOwner`, the same module + optimizer + step as in `LocalPool`.

A worker defends itself against its coordinator: it writes only under the state dir it was started
with (a request naming a path is refused), and `WorkerLimits`, from its command line, bound what it
accepts whatever WELCOME asks: message and frame bytes, the size and number of hosted experts, the
forward cache, and the gradient norm (the coordinator may tighten the check, never switch it off).

One thread: a loop polls the coordinator socket, answers requests in arrival order, sends replies
the simulated network has delayed once they are due, heartbeats, and exits when its parent (the
trainer that spawned it) is gone. Malformed frames and bad requests are answered with ERROR and
counted; nothing a peer sends can crash the loop, and nothing it sends is unpickled.

Legend: a rows routed to one expert in one call, D model width.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import socket
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import zmq

from experts.behaviours import HONEST, Behaviour, ExpertFailure, answer_call, parse_behaviour
from experts.errors import ConfigError, WireError
from experts.heap import keep_freed_memory
from experts.identity import Identity
from experts.modules import FFN, build_expert
from experts.network import Link, LinkSpec
from experts.owner import ExpertOwner, OptimizerSettings
from experts.pool import answer_dtype
from experts.remote.audit_replies import audit_reply, audit_window
from experts.remote.auth import connect_curve
from experts.remote.checkpoint import CHECKPOINT_FILE, load_messages, save_messages
from experts.remote.settings import RequestError, WorkerLimits, WorkerSettings, autocast_from, typed_meta
from experts.remote.wire import (
    RECEIVE_HWM,
    Kind,
    Message,
    decode,
    encode,
    expert_state_from,
    expert_state_message,
    unpack_header,
)
from experts.rows import ComputeSettings

log = logging.getLogger("experts.remote.worker")

HELLO_RETRY_S = 1.0
LOOP_TICK_S = 0.25  # longest sleep between parent checks and heartbeats


@dataclass
class HostedExpert:
    layer_name: str
    spec: dict  # what `experts.modules.build_expert` builds it from
    owner: ExpertOwner
    link: Link


class Worker:
    """One miner process: the loop (socket, registration, heartbeats, delayed replies) and its handlers."""

    def __init__(
        self, coordinator: str, *, name: str, device: str, threads: int, parent_pid: int | None = None,
        state_dir: str | Path | None = None, limits: WorkerLimits | None = None,
        key: Identity | None = None, coordinator_key: str | None = None,
    ):  # fmt: skip
        """`state_dir`: the only folder this worker writes to (None: it keeps no checkpoint). `key` and
        `coordinator_key` (the coordinator's hotkey): connect with CURVE, as this key, to that server only."""
        self.name, self.device, self.threads = name, torch.device(device), threads
        self.parent_pid = parent_pid
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.own_limits = limits = limits or WorkerLimits()
        self.settings = limits.bound(WorkerSettings())  # until WELCOME says otherwise
        self.limits = limits.wire()
        self.experts: dict[tuple[int, int], HostedExpert] = {}
        self.cache: OrderedDict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.delayed: list[tuple[float, int, list]] = []  # (due, seq, frames) heap of held-back replies
        self.sequence = itertools.count()
        self.rejected: Counter = Counter()
        self.errors = 0
        self.registered = False
        self.running = True
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        self.socket.setsockopt(zmq.MAXMSGSIZE, self.limits.max_frame_bytes)
        if (key is None) != (coordinator_key is None):
            raise ConfigError("a worker needs both --key and --coordinator-key to authenticate, or neither")
        if key is not None:
            connect_curve(self.socket, key, coordinator_key)
        self.socket.connect(coordinator)
        self.last_hello = -math.inf
        self.last_heartbeat = time.monotonic()
        self.handlers = {
            Kind.WELCOME: self.on_welcome, Kind.REGISTER_AGAIN: self.on_register_again,
            Kind.HOST: self.on_host, Kind.FORWARD: self.on_forward, Kind.BACKWARD: self.on_backward,
            Kind.STEP: self.on_step, Kind.GET_STATE: self.on_get_state, Kind.LOAD_STATE: self.on_load_state,
            Kind.CHECKPOINT: self.on_checkpoint, Kind.ECHO: self.on_echo,
            Kind.TRAIN_MODE: self.on_train_mode, Kind.SHUTDOWN: self.on_shutdown, Kind.ERROR: self.on_error,
            Kind.KEEP_STATES: self.on_keep_states, Kind.AUDIT: self.on_audit,
        }  # fmt: skip

    # --- loop ------------------------------------------------------------------------------------

    def run(self) -> None:
        log.info("worker %s (pid %d) on %s, %d threads", self.name, os.getpid(), self.device, self.threads)
        keep_freed_memory()
        warm_up(self.device)
        try:
            while self.running and self.parent_alive():
                now = time.monotonic()
                if not self.registered and now - self.last_hello >= HELLO_RETRY_S:
                    self.send_hello()
                if self.socket.poll(self.poll_timeout_ms(now), zmq.POLLIN):
                    self.handle(self.socket.recv_multipart(copy=False))
                self.send_due_replies()
                self.heartbeat_if_due()
        finally:
            self.socket.close(linger=0)
            self.context.term()
            log.info("worker %s stopped", self.name)

    def parent_alive(self) -> bool:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            log.warning("parent %d is gone: exiting", self.parent_pid)
            return False
        return True

    def poll_timeout_ms(self, now: float) -> int:
        wait = min(LOOP_TICK_S, self.last_heartbeat + self.settings.heartbeat_interval - now)
        if self.delayed:
            wait = min(wait, self.delayed[0][0] - now)
        return max(0, int(wait * 1000))

    def handle(self, parts: list) -> None:
        try:
            message = decode(parts, self.limits)
        except WireError as err:
            self.rejected[str(err).split(" ")[0]] += 1
            log.warning("rejected frame: %s", err)
            self.reply(Message(Kind.ERROR, *_address_of(parts), meta={"reason": f"wire: {err}"}))
            return
        handler = self.handlers.get(message.kind)
        try:
            if handler is None:
                raise RequestError(f"a worker does not accept {message.kind.name}")
            handler(message)
        except ExpertFailure as failure:  # the simulated miner gives no answer: not the request's fault
            self.reply_error(message, f"behaviour: {failure}")
        except Exception as err:  # a bad request must never take the worker down
            self.errors += 1
            log.warning("%s for layer %d expert %d failed: %s",
                        message.kind.name, message.layer, message.expert, err)  # fmt: skip
            reason = str(err) if isinstance(err, RequestError) else f"{type(err).__name__}: {err}"
            self.reply_error(message, reason)

    def reply_error(self, message: Message, reason: str) -> None:
        self.reply_to(message, Kind.ERROR, meta={"reason": reason[:500], "request": message.kind.name})

    def reply_to(self, request: Message, kind: Kind, *, meta=None, tensors=(), delay: float | None = 0.0):
        """Reply `kind` to `request`, addressed as it was (call, layer, expert)."""
        reply = Message(kind, request.step, request.layer, request.expert, meta or {}, list(tensors))
        self.reply(reply, delay)

    def send(self, frames: list) -> None:
        try:
            self.socket.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:  # the coordinator is not reading; it will time this reply out
            log.debug("send queue full; reply dropped")

    def reply(self, message: Message, delay: float | None = 0.0) -> None:
        """Send now, after `delay` seconds of simulated network, or never when `delay` is None (dropped)."""
        if delay is None:
            return
        frames = encode(message)
        if delay <= 0:
            self.send(frames)
        elif len(self.delayed) >= self.own_limits.max_cache:  # held replies are bounded like kept forwards
            log.debug("%d replies held back already; this one is dropped", len(self.delayed))
        else:
            heapq.heappush(self.delayed, (time.monotonic() + delay, next(self.sequence), frames))

    def send_due_replies(self) -> None:
        now = time.monotonic()
        while self.delayed and self.delayed[0][0] <= now:
            self.send(heapq.heappop(self.delayed)[2])

    def heartbeat_if_due(self) -> None:
        now = time.monotonic()
        if self.registered and now - self.last_heartbeat >= self.settings.heartbeat_interval:
            meta = {"rejected": sum(self.rejected.values()), "errors": self.errors, "cached": len(self.cache)}
            self.send(encode(Message(Kind.HEARTBEAT, meta=meta)))
            self.last_heartbeat = now

    def send_hello(self) -> None:
        meta = {"name": self.name, "pid": os.getpid(), "host": socket.gethostname(),
                "device": str(self.device), "threads": self.threads}  # fmt: skip
        self.send(encode(Message(Kind.HELLO, meta=meta)))
        self.last_hello = time.monotonic()

    # --- registration and hosting ------------------------------------------------------------------

    def on_welcome(self, message: Message) -> None:
        """The run's settings, within this worker's own limits; a field it does not know (a folder to
        write to, say) refuses the whole WELCOME."""
        self.settings = self.own_limits.bound(typed_meta(WorkerSettings, message.meta, "welcome"))
        self.registered = True
        log.info("registered with the coordinator; state in %s; %s", self.state_dir, self.settings)

    def on_register_again(self, message: Message) -> None:
        self.registered = False
        self.send_hello()

    def on_error(self, message: Message) -> None:
        """The coordinator refused something (a HELLO, say): logged, never answered."""
        self.errors += 1
        log.warning(
            "the coordinator answered %s with: %.300s",
            message.meta.get("request"),
            message.meta.get("reason"),
        )

    def on_host(self, message: Message) -> None:
        meta = message.meta
        if (message.layer, message.expert) not in self.experts and len(
            self.experts
        ) >= self.own_limits.max_experts:
            raise RequestError(f"already hosting {len(self.experts)} experts (--max-experts)")
        module = self.build_within_limits(meta["spec"])
        module.load_state_dict(message.named(), strict=True)
        optim = typed_meta(OptimizerSettings, meta["optim"], "optim")
        owner = ExpertOwner(module, optim, typed_meta(ComputeSettings, meta.get("compute", {}), "compute"))
        hosted = HostedExpert(
            layer_name=str(meta["layer_name"]),
            spec=meta["spec"],
            owner=owner,
            link=Link(typed_meta(LinkSpec, meta.get("link", {}), "link"), meta.get("link_stream", [0])),
        )
        restored = bool(meta.get("restore")) and self.restore(hosted, message.expert)
        hosted.owner.keep_states(audit_window(meta.get("audit_window", 0)))
        self.experts[(message.layer, message.expert)] = hosted
        self.reply_to(message, Kind.HOSTED, meta={"restored": restored})

    def restore(self, hosted: HostedExpert, expert: int) -> bool:
        """Load `hosted` from this worker's own last checkpoint, if it has one for that expert."""
        path = self.checkpoint_path()
        if path is None or not path.exists():
            return False
        mine = (hosted.layer_name, expert)
        saved = [m for m in load_messages(path) if (m.meta.get("layer_name"), m.expert) == mine]
        if not saved:
            return False
        if saved[0].meta.get("spec") != hosted.spec:
            log.warning("checkpoint of %s/%d has another shape; starting fresh", hosted.layer_name, expert)
            return False
        self.load_state(hosted, saved[0])
        log.info("restored %s/%d from %s (step %d)", hosted.layer_name, expert, path, hosted.owner.steps)
        return True

    def build_within_limits(self, spec: dict) -> torch.nn.Module:
        """The expert `spec` describes, sized on the meta device first so an oversized one costs nothing."""
        try:
            with torch.device("meta"):
                shape_only = build_expert(spec)
        except (RuntimeError, ValueError, OverflowError) as err:  # sizes past int64, negative widths
            raise RequestError(f"expert spec cannot be sized ({err}); nothing was built") from None
        megabytes = sum(p.numel() * p.element_size() for p in shape_only.parameters()) / 2**20
        if megabytes > self.own_limits.max_expert_mb:
            raise RequestError(
                f"expert of {megabytes:.0f} MB exceeds --max-expert-mb {self.own_limits.max_expert_mb:g}"
            )
        return build_expert(spec).to(self.device)

    def checkpoint_path(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / CHECKPOINT_FILE

    def expert_of(self, message: Message) -> HostedExpert:
        hosted = self.experts.get((message.layer, message.expert))
        if hosted is None:
            raise RequestError(f"unknown expert {message.expert} of layer {message.layer}")
        return hosted

    # --- compute -----------------------------------------------------------------------------------

    def on_forward(self, message: Message) -> None:
        hosted = self.expert_of(message)
        x_aD = self.single_tensor(message)
        width = int(hosted.spec["d_model"])
        if x_aD.ndim != 2 or x_aD.shape[1] != width or not x_aD.is_floating_point():
            raise RequestError(f"input {x_aD.dtype}{tuple(x_aD.shape)}; expected a float [rows, {width}]")
        x_aD = x_aD.to(self.device)
        behaviour = behaviour_of(message.meta)
        keep = bool(message.meta.get("keep", False))
        if keep:
            x_aD = x_aD.detach().requires_grad_(bool(message.meta.get("grad_input", True)))
        with torch.set_grad_enabled(keep), autocast_from(message.meta, self.device):
            y_aD = self.answer(hosted, behaviour, x_aD, message).to(answer_dtype(x_aD))
        if keep:
            self.cache_put((message.step, message.layer, message.expert), x_aD, y_aD)
        delay = hosted.link.sample(nbytes(x_aD), nbytes(y_aD))
        if delay is not None:
            delay += behaviour.latency_ms / 1e3
        meta = {"version": hosted.owner.version}
        self.reply_to(message, Kind.OUTPUT, meta=meta, tensors=[y_aD.detach()], delay=delay)

    def answer(self, hosted: HostedExpert, behaviour: Behaviour, x_aD: torch.Tensor, message: Message):
        """The expert's output under the behaviour the simulation gives this miner (honest by default)."""
        if behaviour == HONEST:
            return hosted.owner.forward(x_aD)
        peer = None
        if behaviour.kind == "copycat" and (message.layer, int(behaviour.arg)) in self.experts:
            peer = lambda j, x_aD: self.experts[(message.layer, j)].owner.forward(x_aD)  # hosted here only
        seed, step = int(message.meta.get("seed", 0)), int(message.meta.get("step", 0))
        return answer_call(hosted.owner.module, behaviour, x_aD, seed=seed, layer=hosted.layer_name, step=step,
                           expert_idx=message.expert, peer=peer, rows=hosted.owner.row_buckets)  # fmt: skip

    def cache_put(self, key: tuple[int, int, int], x_aD: torch.Tensor, y_aD: torch.Tensor) -> None:
        self.cache[key] = (x_aD, y_aD)
        while len(self.cache) > self.settings.cache_size:
            self.cache.popitem(last=False)

    def on_backward(self, message: Message) -> None:
        """grad_in for a kept forward; parameter gradients accumulate and the forward is dropped, except
        with meta `input_only` (PoI's extra backwards), which leaves both as they were."""
        hosted = self.expert_of(message)
        key = (message.step, message.layer, message.expert)
        if key not in self.cache:
            raise RequestError(f"no kept forward for call {message.step} (evicted or never made)")
        input_only = bool(message.meta.get("input_only", False))
        x_aD, y_aD = self.cache[key] if input_only else self.cache.pop(key)
        grad_y_aD = self.single_tensor(message).to(self.device)
        self.check_gradient(grad_y_aD, y_aD)
        if input_only:
            tensors = [self.input_gradient(x_aD, y_aD, grad_y_aD)] if x_aD.requires_grad else []
        else:
            if y_aD.requires_grad:  # not so when a behaviour answered without the expert (lazy, copycat)
                torch.autograd.backward(y_aD, grad_y_aD)
            tensors = []
            if x_aD.requires_grad:
                tensors = [x_aD.grad if x_aD.grad is not None else torch.zeros_like(x_aD)]
        delay = hosted.link.sample(nbytes(grad_y_aD), sum(map(nbytes, tensors)))
        self.reply_to(message, Kind.GRAD_INPUT, tensors=tensors, delay=delay)

    @staticmethod
    def input_gradient(x_aD: torch.Tensor, y_aD: torch.Tensor, grad_y_aD: torch.Tensor) -> torch.Tensor:
        """d(y·grad_y)/dx with the graph kept and no `.grad` written (x's nor any parameter's)."""
        if not y_aD.requires_grad:
            return torch.zeros_like(x_aD)
        (grad,) = torch.autograd.grad(y_aD, x_aD, grad_y_aD, retain_graph=True, allow_unused=True)
        return grad if grad is not None else torch.zeros_like(x_aD)

    def check_gradient(self, grad_y_aD: torch.Tensor, y_aD: torch.Tensor) -> None:
        """Reject a gradient that would poison the optimizer: wrong shape, non-finite or absurdly large."""
        if grad_y_aD.shape != y_aD.shape or grad_y_aD.dtype != y_aD.dtype:
            raise RequestError(
                f"gradient {grad_y_aD.dtype}{tuple(grad_y_aD.shape)} for output {y_aD.dtype}{tuple(y_aD.shape)}"
            )
        norm = float(grad_y_aD.float().norm())
        if not math.isfinite(norm):
            raise RequestError("non-finite gradient rejected")
        if self.settings.max_grad_norm > 0 and norm > self.settings.max_grad_norm:
            raise RequestError(f"gradient norm {norm:.3g} above max_grad_norm rejected")

    def on_step(self, message: Message) -> None:
        """The owner's step, as in `LocalPool`: clip, step, zero; a non-finite gradient skips it."""
        owner = self.expert_of(message).owner
        report = owner.step(
            learns=bool(message.meta.get("learns", True)),  # a stale miner has stopped stepping
            zero_missing_grads=bool(message.meta.get("zero_missing_grads")),  # called with no tokens
        )
        committed = owner.commitment_at(owner.version)
        meta = {"skipped": report.skipped, "grad_norm": report.grad_norm, "steps": owner.steps,
                "version": owner.version, "commitment": None if committed is None else committed.tolist()}  # fmt: skip
        self.reply_to(message, Kind.STEPPED, meta=meta)

    # --- audits (experts/remote/audit_replies.py) ----------------------------------------------------

    def on_keep_states(self, message: Message) -> None:
        """Commit after every step and keep the last `window` versions of this expert for audits."""
        self.expert_of(message).owner.keep_states(audit_window(message.meta.get("window")))

    def on_audit(self, message: Message) -> None:
        """This expert's state at the version asked, and its next commitment; ERROR when not kept."""
        self.reply(audit_reply(self.expert_of(message).owner, message))

    def single_tensor(self, message: Message) -> torch.Tensor:
        if len(message.tensors) != 1:
            raise RequestError(f"{message.kind.name} needs one tensor, got {len(message.tensors)}")
        return message.tensors[0]

    # --- state -------------------------------------------------------------------------------------

    def on_get_state(self, message: Message) -> None:
        hosted = self.expert_of(message)
        self.reply(self.state_message(Kind.STATE, message.layer, message.expert, hosted, step=message.step))

    def state_message(
        self, kind: Kind, layer: int, expert: int, hosted: HostedExpert, step: int = 0
    ) -> Message:
        """Parameters, optimizer state, and what `restore` checks (layer name, spec, steps)."""
        state = hosted.owner.state_dict()
        params = {k: v.detach().cpu() for k, v in state["module"].items()}
        meta = {"layer_name": hosted.layer_name, "spec": hosted.spec, "steps": state["steps"]}
        address = {"step": step, "layer": layer, "expert": expert}
        return expert_state_message(kind, params, state["optimizer"], meta=meta, **address)

    def on_load_state(self, message: Message) -> None:
        self.load_state(self.expert_of(message), message)
        self.reply_to(message, Kind.LOADED)

    def load_state(self, hosted: HostedExpert, message: Message) -> None:
        """Parameters and optimizer state, and the step count where the message has one (a checkpoint)."""
        params, optimizer_state = expert_state_from(message)
        steps = {"steps": int(message.meta["steps"])} if "steps" in message.meta else {}
        hosted.owner.load_state_dict({"module": params, "optimizer": optimizer_state, **steps})

    def on_checkpoint(self, message: Message) -> None:
        if message.meta:  # the worker, not the coordinator, decides where it writes
            raise RequestError(
                f"CHECKPOINT takes no arguments, got {sorted(message.meta)[:5]}; "
                f"this worker writes only under its own state dir ({self.state_dir})"
            )
        path = self.checkpoint_path()
        if path is not None:  # a run without a run dir keeps no checkpoints
            states = [self.state_message(Kind.STATE, *at, hosted) for at, hosted in self.experts.items()]
            save_messages(path, states)
        meta = {"path": str(path) if path else None, "experts": len(self.experts) if path else 0}
        self.reply(Message(Kind.CHECKPOINTED, message.step, meta=meta))

    # --- control -----------------------------------------------------------------------------------

    def on_echo(self, message: Message) -> None:
        self.reply_to(message, Kind.ECHOED, meta=message.meta, tensors=message.tensors)

    def on_train_mode(self, message: Message) -> None:
        for (layer, _), hosted in self.experts.items():
            if layer == message.layer:
                hosted.owner.module.train(bool(message.meta.get("mode", True)))

    def on_shutdown(self, message: Message) -> None:
        self.running = False


def behaviour_of(meta: dict) -> Behaviour:
    """The behaviour a FORWARD asks this miner to simulate; an unknown one is a bad request."""
    spec = meta.get("behaviour")
    if spec is None:
        return HONEST
    try:
        return parse_behaviour(str(spec))
    except ConfigError as err:
        raise RequestError(str(err)) from None


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def warm_up(device: torch.device) -> None:
    """Pay one-off costs (the optimizer's first use imports torch._dynamo: seconds) before registering,
    so a worker serving its first request is never silent long enough to look dead."""
    owner = ExpertOwner(FFN(4, 4).to(device))
    owner.module(torch.zeros(2, 4, device=device)).sum().backward()
    owner.step()


def _address_of(parts: list) -> tuple[int, int, int]:
    """(step, layer, expert) of a rejected message when its first header is readable, so the sender
    can match the ERROR to its request; zeros otherwise."""
    try:
        header = unpack_header(parts[0])
        return header.step, header.layer, header.expert
    except (WireError, IndexError):
        return 0, 0, 0
