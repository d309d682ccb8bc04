"""A worker defends itself against a hostile coordinator: it writes only under its own state dir and
keeps its own limits (expert size, hosted experts, cache, message bytes, gradient norm, heartbeat
rate) whatever WELCOME asks. The coordinator here is a bare ROUTER socket the test drives by hand.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zmq

from experts.modules import FFN, expert_spec
from experts.remote.wire import Kind, Message, decode, encode, named_message
from tests.experts.test_remote import python_path

WORKER_LIMITS = ["--max-expert-mb", "1", "--max-experts", "2", "--max-cache", "2", "--max-grad-norm", "10",
                 "--max-message-mb", "1"]  # fmt: skip


class FakeCoordinator:
    """A ROUTER that one worker process has said HELLO to; `ask` sends and waits for the reply."""

    def __init__(self, folder: Path, sock: zmq.Socket, identity: bytes, process: subprocess.Popen):
        self.folder, self.socket, self.identity, self.process = folder, sock, identity, process
        self.heartbeats = 0

    def send(self, message: Message) -> None:
        self.socket.send_multipart([self.identity, *encode(message)])

    def replies(self, seconds: float) -> list[Message]:
        received, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and self.socket.poll(int(left * 1000)):
            message = decode(self.socket.recv_multipart()[1:])
            if message.kind == Kind.HEARTBEAT:
                self.heartbeats += 1
            elif message.kind != Kind.HELLO:
                received.append(message)
        return received

    def ask(self, message: Message, timeout: float = 30.0) -> Message:
        """Send `message`, then ECHO as a barrier: the reply to `message` (or None) comes before ECHOED."""
        self.send(message)
        self.send(Message(Kind.ECHO, step=999_999))
        received, deadline = [], time.monotonic() + timeout
        while not any(m.kind == Kind.ECHOED for m in received) and time.monotonic() < deadline:
            received += self.replies(0.1)
        answers = [m for m in received if m.kind != Kind.ECHOED]
        assert any(m.kind == Kind.ECHOED for m in received), "the worker stopped answering"
        return answers[0] if answers else None


@pytest.fixture(scope="module")
def victim(tmp_path_factory):
    """One worker process (state dir `<folder>/state`, tight `WORKER_LIMITS`) and its fake coordinator."""
    folder = tmp_path_factory.mktemp("victim")
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    address = f"ipc://{folder / 'coordinator.sock'}"
    router.bind(address)
    command = [sys.executable, "-m", "experts.worker", "--coordinator", address, "--name", "victim",
               "--state-dir", str(folder / "state"), "--log-level", "WARNING", *WORKER_LIMITS]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": python_path()}
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
    try:
        assert router.poll(90_000), "the worker never said HELLO"
        identity = router.recv_multipart()[0]
        yield FakeCoordinator(folder, router, identity, process)
        assert process.poll() is None, "the worker died"
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(timeout=10)
        router.close()
        context.term()


def host(expert: int) -> Message:
    module = FFN(8, 16)
    meta = {"layer_name": "l0", "spec": expert_spec(module, expert), "optim": {"lr": 0.01}, "restore": False}
    return named_message(Kind.HOST, module.state_dict(), meta=meta, step=expert + 1, expert=expert)


@pytest.mark.timeout(120)
def test_a_coordinator_asking_a_worker_to_write_elsewhere_gets_an_error_and_nothing_is_written(victim):
    elsewhere = victim.folder / "elsewhere"
    refused = victim.ask(Message(Kind.WELCOME, meta={"checkpoint_dir": str(elsewhere)}))
    assert refused.kind == Kind.ERROR
    assert "checkpoint_dir" in refused.meta["reason"]
    assert victim.ask(Message(Kind.WELCOME, meta={"cache_size": 2})) is None  # a plain WELCOME is taken
    assert victim.ask(host(0)).kind == Kind.HOSTED
    for meta in ({"path": str(elsewhere / "x.safetensors")}, {"checkpoint_dir": str(elsewhere)}):
        refused = victim.ask(Message(Kind.CHECKPOINT, 5, meta=meta))
        assert refused.kind == Kind.ERROR
        assert "own state dir" in refused.meta["reason"]
    assert not elsewhere.exists()
    written = victim.ask(Message(Kind.CHECKPOINT, 6))
    assert written.kind == Kind.CHECKPOINTED
    assert Path(written.meta["path"]) == victim.folder / "state" / "experts.safetensors"
    files = sorted(p.relative_to(victim.folder).as_posix() for p in victim.folder.rglob("*") if p.is_file())
    assert files == ["state/experts.safetensors"]  # and the socket; nothing anywhere else


@pytest.mark.timeout(120)
def test_a_worker_keeps_its_own_limits_whatever_welcome_asks(victim):
    loosest = {"max_grad_norm": 0.0, "cache_size": 10**9, "heartbeat_interval": 1e-9}
    assert victim.ask(Message(Kind.WELCOME, meta=loosest)) is None
    tick = time.monotonic()
    oversized = victim.ask(spec_only(1, 1024, 4096))  # 32 MB of parameters, limit 1 MB
    assert oversized.kind == Kind.ERROR
    assert "--max-expert-mb" in oversized.meta["reason"]
    huge = victim.ask(spec_only(1, 2**40, 2**40))  # petabytes
    assert huge.kind == Kind.ERROR
    assert "cannot be sized" in huge.meta["reason"]
    assert time.monotonic() - tick < 20  # sized on the meta device: nothing was allocated
    assert victim.ask(host(1)).kind == Kind.HOSTED
    third = victim.ask(host(2))
    assert third.kind == Kind.ERROR
    assert "--max-experts" in third.meta["reason"]

    outputs = [victim.ask(Message(Kind.FORWARD, call, 0, 1, meta={"keep": True}, tensors=[torch.randn(3, 8)]))
               for call in (11, 12, 13)]  # fmt: skip
    assert [m.kind for m in outputs] == [Kind.OUTPUT] * 3
    evicted = victim.ask(Message(Kind.BACKWARD, 11, 0, 1, tensors=[torch.ones(3, 8)]))
    assert evicted.kind == Kind.ERROR
    assert "no kept forward" in evicted.meta["reason"]
    too_steep = victim.ask(Message(Kind.BACKWARD, 13, 0, 1, tensors=[torch.full((3, 8), 100.0)]))
    assert too_steep.kind == Kind.ERROR
    assert "max_grad_norm" in too_steep.meta["reason"]
    assert victim.ask(Message(Kind.BACKWARD, 12, 0, 1, tensors=[torch.ones(3, 8)])).kind == Kind.GRAD_INPUT

    too_big = victim.ask(Message(Kind.ECHO, 7, tensors=[torch.zeros(300_000)] * 2))  # 2.4 MB, limit 1 MB
    assert too_big.kind == Kind.ERROR
    assert "exceeds" in too_big.meta["reason"]
    before = victim.heartbeats
    victim.replies(1.0)
    assert victim.heartbeats - before <= 25  # heartbeat_interval clamped to ≥ 0.05 s, not 1e-9


def spec_only(expert: int, d_model: int, d_ff: int) -> Message:
    """HOST of an FFN of that size without its tensors: the worker must refuse it before building it."""
    spec = {"kind": "ffn", "d_model": d_model, "d_ff": d_ff, "activation": "gelu"}
    meta = {"layer_name": "l0", "spec": spec, "optim": {}, "names": []}
    return Message(Kind.HOST, 50, 0, expert, meta=meta)
