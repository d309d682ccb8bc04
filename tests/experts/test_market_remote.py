"""The market with transport=process: one worker per provider, and the issue's promise that killing the
worker of a leased expert moves the lease while the expert keeps its trained state (its owner's last
checkpoint). Every test has a hard timeout and stops every worker it started."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from experts.market import LeaseBook, MarketConfig, ProviderClassConfig, build_providers
from experts.market.offers import worker_name
from experts.remote import ProcessTransport, ProcessTransportConfig
from experts.remote.checkpoint import CHECKPOINT_FILE, load_messages
from experts.remote.wire import expert_state_from
from experts.transport import Placement
from tests.experts.test_remote import EXPERTS_CFG, FAST, NUM_TOKENS, PAIRS, D, E, make_experts, run_layer

LAYER = "chaos"


@contextlib.contextmanager
def provider_transport(run_dir: Path, hosts: list[str]):
    """A ProcessTransport with one worker per market provider, always stopped."""
    cfg = ProcessTransportConfig(**FAST, threads=1)
    transport = ProcessTransport(cfg, device=torch.device("cpu"), run_dir=run_dir, seed=0, hosts=hosts)
    try:
        yield transport
    finally:
        transport.close()
        assert all(process.poll() is not None for process in transport.processes)


def assert_same(saved, moved) -> None:
    """Equal nested states: tensors bit for bit, everything else by value."""
    if isinstance(saved, torch.Tensor):
        torch.testing.assert_close(moved, saved, atol=0, rtol=0)
    elif isinstance(saved, dict):
        assert {str(k) for k in saved} == {str(k) for k in moved}
        by_name = {str(k): v for k, v in moved.items()}
        for key, value in saved.items():
            assert_same(value, by_name[str(key)])
    elif isinstance(saved, list | tuple):
        assert len(saved) == len(moved)
        for a, b in zip(saved, moved, strict=True):
            assert_same(a, b)
    else:
        assert saved == moved


@pytest.mark.timeout(120)
def test_killing_a_leased_experts_worker_moves_the_lease_with_its_owners_last_checkpoint(tmp_path):
    market = MarketConfig({"p": ProviderClassConfig(count=2, capacity=E, price=0.01)})
    book = LeaseBook(market, build_providers(market, seed=0), [], E)
    with provider_transport(tmp_path, book.worker_names) as transport:
        assert sorted(transport.coordinator.registered_names()) == ["p-0", "p-1"]
        pool = transport.make_pool(LAYER, make_experts(), EXPERTS_CFG, Placement(*book.placement(LAYER)))
        assert pool.hosts == ["p-0"] * E  # the cheapest offer with room; the tie goes to p/0
        for step in range(2):
            run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS, seed=step, step=step)
            pool.step(step)
        pool.state_dict()  # the owners write their own checkpoints too
        saved = {
            m.expert: expert_state_from(m)
            for m in load_messages(tmp_path / "workers" / "p-0" / CHECKPOINT_FILE)
        }
        run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS, step=2)
        pool.step(2)  # the experts move past that checkpoint

        transport.processes[0].kill()
        transport.processes[0].wait(timeout=10)
        answered_E = run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS, step=3)[3]
        assert not answered_E[:3].any()  # expert 3 has no tokens in PAIRS
        alive = lambda provider: transport.host_alive(worker_name(provider))
        moves = book.update(3, {LAYER: pool.last_failures}, alive=alive)
        assert [(m.expert, m.source, m.target) for m in moves] == [(e, "p/0", "p/1") for e in range(E)]
        for move in moves:
            pool.move_expert(move.expert, move.link, move.host)
        assert pool.hosts == ["p-1"] * E

        moved = pool.state_dict()  # fetched from the new owner, right after the move
        for e in range(E):
            assert_same(saved[e][0], moved["experts"][e])
            assert_same(saved[e][1], moved["optimizers"][e])
        answered_E = run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS, step=4)[3]
        assert answered_E.all()
        assert pool.last_failures == {}


TWO_PROVIDERS = [
    "debug=default",
    "data=clusters",
    "transport=process",
    "transport.threads=1",
    "transport.checkpoint_every=2",
    "trainer.threads=1",
    "trainer.log_every=1",
    "market=hetero",
    "~market.providers.fast_dear",
    "~market.providers.slow_cheap",
    "~market.providers.flaky",
    "market.providers.fast_cheap.capacity=4",  # fast_cheap/0 hosts every expert of the layer; /1 is spare
]


@pytest.mark.timeout(180)
def test_a_run_whose_providers_worker_is_killed_moves_its_experts_and_finishes(tmp_path, caplog):
    import logging
    import os
    import signal
    import threading
    import time

    from moe.engine.checkpoint import load_checkpoint
    from moe.engine.loop import train
    from tests.experts.test_remote import _last_step, _pid_in_log, train_losses
    from tests.helpers import compose

    run_dir, steps = tmp_path / "run", 30
    killed_at: list[int] = []

    def kill_when_trained() -> None:
        deadline = time.monotonic() + 90
        pid = _pid_in_log(run_dir / "workers" / "fast_cheap-0" / "worker.log", deadline)
        while _last_step(run_dir) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        killed_at.append(_last_step(run_dir))
        os.kill(pid, signal.SIGKILL)

    caplog.set_level(logging.INFO, logger="experts.remote.spawn")  # workers log their pid at INFO
    killer = threading.Thread(target=kill_when_trained, daemon=True)
    killer.start()
    cfg = [*TWO_PROVIDERS, f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", f"run_dir={run_dir}"]
    summary = train(compose([*cfg, f"trainer.ckpt_every={steps}"]))
    killer.join(timeout=10)
    assert killed_at
    assert killed_at[0] < steps
    assert summary["market/moves"] == 4  # every expert of the one MoE layer left fast_cheap/0
    _, state = load_checkpoint(run_dir)
    assert {lease[2] for lease in state["market"]["leases"]} == {"fast_cheap/1"}
    assert not state["incomplete"]  # the moved experts are checkpointed by their new owner
    assert len(train_losses(run_dir)) == steps
