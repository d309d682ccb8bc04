"""The trainer's side of `transport=process`: one ZeroMQ ROUTER socket (`ipc://` or `tcp://`) that
workers connect to, the registry of live workers (HELLO, heartbeats, process exits), and the
request/collect loop the pools send their calls through; re-hosting on rejoin goes to the pools.

Threading: none of our own beyond pyzmq's ZAP thread under CURVE (`experts.remote.auth`). The
coordinator runs in the trainer's thread and reads its socket only inside pool calls; ZeroMQ's I/O
thread queues whatever arrives in between. A worker counts as dead when its process exited, its
connection is gone, or nothing came from it for `heartbeat_interval * heartbeat_misses` seconds; it
is alive again when it speaks (or re-registers).

Trust: under CURVE only allow-listed keys connect, and every frame carries its sender's hotkey. A
worker name belongs to the key that first registered it (spawned workers' names to the keys made for
them): a HELLO for that name from another key is refused, logged and counted, as is any HELLO past
`max_workers` names. Only registered workers are ever sent anything but a refusal. A frame that does
not decode is counted in `rejected` and dropped; nothing a peer sends raises out of `receive`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import zmq

from experts.errors import ConfigError, WireError
from experts.identity import Identity, load_or_create
from experts.remote.auth import AllowList, PrivateFolder, peer_hotkey, serve_curve, sparse, uses_curve
from experts.remote.settings import WorkerSettings, settings_meta
from experts.remote.wire import RECEIVE_HWM, Kind, Message, WireLimits, decode, encode

if TYPE_CHECKING:
    from experts.remote.client import RemotePool
    from experts.remote.spawn import ProcessTransportConfig

log = logging.getLogger(__name__)

LIVENESS_TICK_S = 0.05  # longest wait on the socket before checking whether a worker died
SHUTDOWN_LINGER_MS = 500  # how long closing may wait to deliver SHUTDOWN to the workers
WORKER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # names end up in paths and logs

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
    hotkey: str | None = None  # the key this name is bound to (None without CURVE)
    state_dir: Path | None = None  # where the worker keeps its own checkpoint, when we started it
    identity: bytes | None = None  # its ZeroMQ routing id while connected
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
        self.limits = WireLimits.from_mb(cfg.max_frame_mb, cfg.max_message_mb)
        self.max_workers = cfg.max_workers or cfg.workers + cfg.external_workers
        self.curve = uses_curve(cfg.auth, cfg.address)
        self.identity: Identity = load_or_create(cfg.key) if cfg.key else Identity.generate()
        self.allow_list = AllowList(cfg.allowed_keys)
        self.private = PrivateFolder()  # the ipc socket and the keys made for this run
        self.context = zmq.Context()
        self.authenticator = None
        self.socket = self.context.socket(zmq.ROUTER)
        self.workers: dict[str, WorkerRecord] = {}
        self.names_by_identity: dict[bytes, str] = {}
        self.pools: dict[int, RemotePool] = {}
        self.rejected: Counter = Counter()  # malformed frames received, by first word of the reason
        self.refused: Counter = Counter()  # HELLOs refused: name taken by another key, cap, bad name
        self.stray: Counter = Counter()  # replies nobody waits for any more (late, duplicate, foreign)
        self.request_ids = itertools.count(1)
        try:
            self.address, self.connect_address = self._open(cfg)
        except BaseException:
            self.close()
            raise
        auth = f"CURVE, coordinator key {self.identity.hotkey}" if self.curve else "no authentication"
        log.info("coordinator listening on %s (%s)", self.address, auth)

    def _open(self, cfg) -> tuple[str, str]:
        """Set the socket's limits (and CURVE, before any peer can connect), bind; (address, connect address)."""
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished worker fails at once
        self.socket.setsockopt(zmq.SNDHWM, 64)
        self.socket.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        self.socket.setsockopt(zmq.MAXMSGSIZE, self.limits.max_frame_bytes)
        if self.curve:
            self.authenticator = serve_curve(self.socket, self.identity, self.allow_list)
        if cfg.address == "ipc":
            address = f"ipc://{self.private.path / 'coordinator.sock'}"
            self.socket.bind(address)
            return address, address
        if cfg.address == "tcp":
            if cfg.port:
                self.socket.bind(f"tcp://{cfg.host}:{cfg.port}")
                port = cfg.port
            else:
                port = self.socket.bind_to_random_port(f"tcp://{cfg.host}")
            local_host = "127.0.0.1" if cfg.host in ("0.0.0.0", "*") else cfg.host
            return f"tcp://{cfg.host}:{port}", f"tcp://{local_host}:{port}"
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
            try:
                envelope = self._accept(parts)
            except WireError as err:
                self.rejected[str(err).split(" ")[0]] += 1
                log.warning("rejected frame from %r: %s", parts[0].bytes[:16], err)
                continue
            if envelope is not None:
                replies.append(envelope)

    def drain(self) -> None:
        for name, message in self.receive(0):
            self.handle_stray(name, message)

    def _accept(self, parts: list) -> tuple[str, Message] | None:
        identity, hotkey = parts[0].bytes, peer_hotkey(parts[-1])
        message = decode(parts[1:], self.limits)
        if message.kind == Kind.HELLO:
            self.register(identity, hotkey, message.meta)
            return None
        name = self.names_by_identity.get(identity)
        if name is None:  # a worker registered with an earlier coordinator: ask it to register here
            self._send_raw(identity, Message(Kind.REGISTER_AGAIN))
            return None
        record = self.workers[name]
        if record.hotkey != hotkey:
            raise WireError(f"frame from key {hotkey} on the connection of worker {name}")
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
            dead = {name for name in set(pending.values()) if not self.is_alive(name)}
            for key in [key for key, name in pending.items() if name in dead]:
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

    def expect(
        self,
        name: str,
        process: subprocess.Popen | None,
        key: Identity | None = None,
        state_dir: Path | None = None,
    ) -> None:
        """A worker this trainer started: its name is bound to `key` before anyone can say HELLO."""
        hotkey = key.hotkey if key is not None else None
        if hotkey is not None:
            self.allow_list.add(hotkey)
        pid = process.pid if process else None
        self.workers[name] = WorkerRecord(name, hotkey, state_dir, process=process, pid=pid)

    def attach(self, pool: RemotePool) -> int:
        """Route `pool`'s asynchronous acks and rejoins to it; returns its layer number on the wire."""
        layer = len(self.pools)
        self.pools[layer] = pool
        return layer

    def register(self, identity: bytes, hotkey: str | None, meta: dict) -> None:
        """HELLO from `hotkey`: the name's first key binds it; another key, a bad name or one name past
        `max_workers` is refused with an ERROR that carries nothing else."""
        name = meta.get("name")
        record = self.workers.get(name) if isinstance(name, str) else None
        if not isinstance(name, str) or not WORKER_NAME.fullmatch(name):
            self.refuse(identity, "name", f"worker name {str(name)[:80]!r} is not [A-Za-z0-9._-], at most 64")
            return
        if record is None and len(self.workers) >= self.max_workers:
            self.refuse(
                identity, "cap", f"{len(self.workers)} worker names registered (transport.max_workers)"
            )
            return
        if record is not None and record.hotkey != hotkey:
            self.refuse(identity, "taken", f"worker name {name} belongs to key {record.hotkey}, not {hotkey}")
            return
        rejoining = record is not None and record.identity is not None and record.identity != identity
        if record is None:
            record = self.workers[name] = WorkerRecord(name=name, hotkey=hotkey)
        if rejoining:
            self.names_by_identity.pop(record.identity, None)
            if record.process is not None and record.process.pid != meta.get("pid"):
                record.process = None  # restarted by someone else: no longer ours to watch
        record.identity, record.pid, record.device = identity, meta.get("pid"), str(meta.get("device", "?"))
        record.alive, record.exited, record.last_seen = True, False, time.monotonic()
        self.names_by_identity[identity] = name
        self.send(name, Message(Kind.WELCOME, meta=settings_meta(WorkerSettings, self.cfg)))
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

    def refuse(self, identity: bytes, reason: str, detail: str) -> None:
        self.refused[reason] += 1
        if sparse(self.refused[reason]):
            log.warning("refused HELLO (%d× %s so far): %s", self.refused[reason], reason, detail)
        self._send_raw(
            identity, Message(Kind.ERROR, meta={"reason": f"refused: {detail}", "request": "HELLO"})
        )

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
                    f"{others}/{extra} external; start them with {self.join_command()}"
                )
            self.socket.poll(int(LIVENESS_TICK_S * 1000), zmq.POLLIN)

    def join_command(self) -> str:
        """How a worker started by hand joins this coordinator."""
        command = f"python -m experts.worker --coordinator {self.address} --name NAME"
        if self.curve:
            command += (
                f" --coordinator-key {self.identity.hotkey} --key KEY (its hotkey in transport.allowed_keys)"
            )
        return command

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
        if self.authenticator is not None:
            self.authenticator.stop()
        self.context.term()
        self.private.close()
