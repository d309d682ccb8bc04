"""The trust boundary of `transport=process`: each attack found on it, reproduced and shown to fail.

- a flood of HELLOs registers at most `max_workers` names;
- a worker name belongs to the key that first registered it: an impostor's HELLO is refused;
- a key not on the allow-list never completes the CURVE handshake, so it sends and receives nothing;
- a training run with an impostor and strangers hammering the coordinator gets nothing to them and
  ends with the losses of a run without them;
- an admitted miner's garbage (the fuzz corpus, deeply nested JSON) leaves trainer and worker running.

Every test that starts processes tears them down and has a hard timeout.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq

from experts.identity import Identity
from experts.pool import LocalPool
from experts.remote import Coordinator, ProcessTransportConfig
from experts.remote.auth import connect_curve
from experts.remote.wire import Kind, Message, decode, encode
from tests.experts.test_remote import (
    EXPERTS_CFG,
    FAST,
    NUM_TOKENS,
    PAIRS,
    TRAIN_TINY,
    D,
    make_experts,
    process_transport,
    python_path,
    run_layer,
    train_losses,
)
from tests.experts.wire_corpus import corpus, meta_pair, nested_json


@contextlib.contextmanager
def coordinator_alone(**overrides):
    """A coordinator with no spawned workers, waiting for `external_workers` peers."""
    cfg = ProcessTransportConfig(**{**FAST, "workers": 0, "external_workers": 2, **overrides})
    coordinator = Coordinator(cfg, None)
    try:
        yield coordinator
    finally:
        coordinator.close()


@contextlib.contextmanager
def peer(address: str, key: Identity | None = None, server_hotkey: str | None = None):
    """A DEALER socket: a CURVE client as `key` when given, a plain one otherwise."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if key is not None:
        connect_curve(sock, key, server_hotkey)
    sock.connect(address)
    try:
        yield sock
    finally:
        sock.close()
        context.term()


def hello(name: str) -> list:
    return encode(Message(Kind.HELLO, meta={"name": name, "pid": 1}))


def pump(coordinator: Coordinator, until, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not until() and time.monotonic() < deadline:
        coordinator.drain()
        time.sleep(0.01)
    assert until(), "condition not reached in time"


def inbox(sock: zmq.Socket, seconds: float) -> list[Message]:
    """Everything `sock` receives within `seconds`."""
    received, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000)):
            received.append(decode(sock.recv_multipart()))
    return received


# --- registration ------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_twenty_thousand_hellos_from_one_socket_register_at_most_max_workers(caplog):
    hellos = 20_000
    with coordinator_alone() as coordinator, peer(coordinator.connect_address) as flood:
        caplog.set_level(logging.WARNING, logger="experts.remote.coordinator")
        for i in range(hellos):
            flood.send_multipart(hello(f"m{i}"))
            if i % 500 == 0:
                coordinator.drain()
        pump(coordinator, lambda: len(coordinator.workers) + coordinator.refused["cap"] == hellos, 60)
        assert coordinator.registered_names() == ["m0", "m1"]
        assert coordinator.refused == {"cap": hellos - 2}
    refusals = [r for r in caplog.records if "refused HELLO" in r.getMessage()]
    assert 1 <= len(refusals) <= 16  # counted, logged sparsely: a flood never floods the log


def test_hellos_with_names_that_would_be_paths_are_refused():
    with coordinator_alone() as coordinator, peer(coordinator.connect_address) as sock:
        for name in ["../../etc", "a/b", "", "x" * 65, ".hidden"]:
            sock.send_multipart(hello(name))
        sock.send_multipart(encode(Message(Kind.HELLO, meta={"name": ["w0"]})))
        pump(coordinator, lambda: coordinator.refused["name"] == 6)
        assert coordinator.workers == {}


@pytest.mark.timeout(60)
def test_a_worker_name_belongs_to_the_key_that_first_registered_it(caplog):
    alice, mallory = Identity.generate(), Identity.generate()
    allowed = [alice.hotkey, mallory.hotkey]
    with coordinator_alone(address="tcp", allowed_keys=allowed) as coordinator:
        server = coordinator.identity.hotkey
        with peer(coordinator.connect_address, alice, server) as honest, \
                peer(coordinator.connect_address, mallory, server) as impostor:  # fmt: skip
            honest.send_multipart(hello("w-alice"))
            pump(coordinator, lambda: coordinator.is_alive("w-alice"))
            alice_connection = coordinator.workers["w-alice"].identity
            impostor.send_multipart(hello("w-alice"))
            pump(coordinator, lambda: coordinator.refused["taken"] == 1)
            record = coordinator.workers["w-alice"]
            assert (record.hotkey, record.identity) == (alice.hotkey, alice_connection)
            coordinator.send("w-alice", Message(Kind.ECHO, 7, tensors=[torch.ones(3)]))
            to_alice, to_mallory = inbox(honest, 1.0), inbox(impostor, 0.2)
    assert [m.kind for m in to_alice] == [Kind.WELCOME, Kind.ECHO]
    assert [m.kind for m in to_mallory] == [Kind.ERROR]  # a refusal, nothing else
    assert "belongs to key" in to_mallory[0].meta["reason"]
    assert not to_mallory[0].tensors
    assert "w-alice belongs to key" in caplog.text


@pytest.mark.timeout(60)
def test_a_key_not_on_the_allow_list_and_a_plain_socket_reach_nothing():
    stranger = Identity.generate()
    with coordinator_alone(address="tcp", allowed_keys=[Identity.generate().hotkey]) as coordinator:
        server = coordinator.identity.hotkey
        with peer(coordinator.connect_address, stranger, server) as curved, \
                peer(coordinator.connect_address) as plain:  # fmt: skip
            for sock in (curved, plain):
                sock.send_multipart(hello("w0"))
                sock.send_multipart([b"junk"])
            pump(coordinator, lambda: sum(coordinator.allow_list.refused.values()) >= 1)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                coordinator.drain()
            assert inbox(curved, 0.2) == []
            assert inbox(plain, 0.2) == []
        assert coordinator.workers == {}
        assert not coordinator.rejected
        assert not coordinator.refused


@pytest.mark.timeout(120)
def test_keys_made_for_the_run_are_private_and_outside_the_run_dir(tmp_path):
    with process_transport(tmp_path, address="tcp", workers=1) as transport:
        private = transport.coordinator.private.path
        key_file = private / "keys" / "w0.key"
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert not private.is_relative_to(tmp_path)
        assert transport.coordinator.workers["w0"].hotkey == Identity.load(key_file).hotkey
        assert transport.coordinator.is_alive("w0")
    assert not private.exists()
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".key", ".sock")]


@pytest.mark.timeout(120)
def test_the_ipc_socket_lives_in_a_folder_only_this_user_can_enter(tmp_path):
    with process_transport(tmp_path, workers=1) as transport:
        socket_path = Path(transport.coordinator.address.removeprefix("ipc://"))
        assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700
        assert transport.coordinator.is_alive("w0")


@pytest.mark.timeout(180)
def test_a_worker_started_by_hand_joins_a_curve_coordinator_with_its_own_key(tmp_path):
    from tests.helpers import run_cli

    made = run_cli("-m", "experts.worker", "keygen", str(tmp_path / "miner.key"))
    hotkey = made.stdout.strip()
    assert made.returncode == 0
    assert hotkey == Identity.load(tmp_path / "miner.key").hotkey
    assert stat.S_IMODE((tmp_path / "miner.key").stat().st_mode) == 0o600
    again = run_cli("-m", "experts.worker", "keygen", str(tmp_path / "miner.key"))
    assert again.returncode != 0
    assert "not overwriting" in again.stderr

    owner = Identity.generate()
    owner.save(tmp_path / "owner.key")
    port = free_port()
    command = ["-m", "experts.worker", "--coordinator", f"tcp://127.0.0.1:{port}", "--name", "miner",
               "--key", str(tmp_path / "miner.key"), "--coordinator-key", str(tmp_path / "owner.key.pub"),
               "--log-level", "WARNING"]  # fmt: skip
    hand_started = subprocess.Popen(
        [sys.executable, *command], env={**os.environ, "PYTHONPATH": python_path()}
    )
    try:
        overrides = {"address": "tcp", "port": port, "key": str(tmp_path / "owner.key"), "workers": 1,
                         "external_workers": 1, "allowed_keys": [hotkey]}  # fmt: skip
        with process_transport(tmp_path / "run", **overrides) as transport:
            coordinator = transport.coordinator
            assert coordinator.workers["miner"].hotkey == hotkey
            experts = make_experts(seed=5)
            local = LocalPool(copy.deepcopy(experts), EXPERTS_CFG)
            remote = transport.make_pool("hand", experts, EXPERTS_CFG)
            assert sorted(set(remote.hosts)) == ["miner", "w0"]
            x_ND = torch.randn(NUM_TOKENS, D)
            for a, b in zip(run_layer(local, x_ND, PAIRS), run_layer(remote, x_ND, PAIRS), strict=True):
                torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            hand_started.kill()
        hand_started.wait(timeout=10)


# --- a training run under attack ---------------------------------------------------------------------


class Attacker(threading.Thread):
    """Says HELLO as `names` every 50 ms until stopped, and keeps whatever it receives."""

    def __init__(
        self, address: str, names: list[str], key: Identity | None = None, server: str | None = None
    ):
        super().__init__(daemon=True)
        self.address, self.names, self.key, self.server = address, names, key, server
        self.received: list[Message] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with peer(self.address, self.key, self.server) as sock:
            while not self.stop.is_set():
                for name in self.names:
                    with contextlib.suppress(zmq.Again):
                        sock.send_multipart(hello(name), flags=zmq.NOBLOCK)
                self.received += inbox(sock, 0.05)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.timeout(240)
def test_an_impostor_and_strangers_get_nothing_and_the_run_keeps_its_losses(tmp_path, caplog):
    from moe.engine.loop import train
    from tests.helpers import compose

    owner, owner_key, impostor = tmp_path / "owner.key", Identity.generate(), Identity.generate()
    owner_key.save(owner)
    impostor.save(tmp_path / "impostor.key")
    port, steps = free_port(), 12
    common = [
        *TRAIN_TINY,
        "transport=process",
        "transport.address=tcp",
        f"transport.key={owner}",
        f"transport.allowed_keys=[{tmp_path / 'impostor.key.pub'}]",  # admitted, yet no worker name is its
        f"trainer.max_steps={steps}",
        f"trainer.eval_every={steps}",
        f"trainer.ckpt_every={steps}",
    ]
    address = f"tcp://127.0.0.1:{port}"
    attackers = [
        Attacker(address, ["w0", "w1", "w9"], impostor, owner_key.hotkey),  # takeovers, a name past the cap
        Attacker(address, ["w0"], Identity.generate(), owner_key.hotkey),  # a key nobody allowed
        Attacker(address, ["w0"]),  # no CURVE at all
    ]
    for attacker in attackers:
        attacker.start()
    try:
        with caplog.at_level(logging.WARNING):
            train(compose([*common, f"transport.port={port}", f"run_dir={tmp_path / 'attacked'}"]))
    finally:
        for attacker in attackers:
            attacker.stop.set()
            attacker.join(timeout=10)
    train(compose([*common, f"run_dir={tmp_path / 'quiet'}"]))

    impostor_got, stranger_got, plain_got = (a.received for a in attackers)
    assert impostor_got, "the impostor's HELLOs never reached the coordinator"
    assert {m.kind for m in impostor_got} == {Kind.ERROR}  # refusals only: no WELCOME, HOST, calls
    assert not any(m.tensors for m in impostor_got)
    reasons = {m.meta["reason"].split(" ")[1] for m in impostor_got}
    assert reasons <= {"worker", "2"}  # "worker name w0 belongs to key …", "2 worker names registered"
    assert stranger_got == []
    assert plain_got == []
    assert "belongs to key" in caplog.text
    assert "not on the allow-list" in caplog.text
    attacked, quiet = train_losses(tmp_path / "attacked"), train_losses(tmp_path / "quiet")
    assert len(attacked) == steps
    assert attacked == quiet


# --- garbage from an admitted miner ------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_the_fuzz_corpus_and_nested_json_leave_the_trainer_and_its_workers_running(tmp_path):
    mallory = Identity.generate()
    with process_transport(tmp_path, address="tcp", allowed_keys=[mallory.hotkey]) as transport:
        coordinator = transport.coordinator
        frames = [*corpus(1500, seed=1), meta_pair(nested_json(100_000, random.Random(0)))]
        w0 = coordinator.workers["w0"].identity
        with peer(coordinator.connect_address, mallory, coordinator.identity.hotkey) as sock:
            for i, message in enumerate(frames):
                sock.send_multipart(message or [b""])  # to the trainer, from an admitted key
                coordinator.socket.send_multipart([w0, *(message or [b""])])  # to a worker, from the trainer
                if i % 100 == 0:
                    coordinator.drain()
            pump(coordinator, lambda: sum(coordinator.rejected.values()) >= 1000, 60)
        rejected_at_trainer = sum(coordinator.rejected.values())
        experts = make_experts(seed=4)
        local = LocalPool(copy.deepcopy(experts), EXPERTS_CFG)
        remote = transport.make_pool("after-fuzz", experts, EXPERTS_CFG)
        x_ND = torch.randn(NUM_TOKENS, D)
        for a, b in zip(run_layer(local, x_ND, PAIRS), run_layer(remote, x_ND, PAIRS), strict=True):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        pump(coordinator, lambda: coordinator.workers["w0"].stats.get("rejected", 0) >= 1000, 30)
        assert all(p.poll() is None for p in transport.processes)
        assert coordinator.registered_names() == ["w0", "w1"]
    assert rejected_at_trainer >= 1000
