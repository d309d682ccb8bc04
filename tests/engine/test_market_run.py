"""A run with a compute market (`market=hetero`): experts move as leases change hands, charges are
counted, and a resumed run continues the lease book and the losses exactly."""

from __future__ import annotations

import shutil

import pytest

from moe.engine.checkpoint import load_checkpoint
from moe.engine.metrics import read_metrics
from moe.experiments.trained import load_trained
from tests.helpers import keep_only_checkpoint

# flaky providers qualify (slow_cheap's 160 ms round trip does not) and drop every reply: the 4 experts
# go to flaky/0, flaky/1, fast_cheap/0 and fast_cheap/1 (one per provider: capacity is 1 per layer); after
# one failed call the two on flaky providers move to the next offers, fast_dear/0 and fast_dear/1
MARKET = [
    "market=hetero",
    "market.requirement.max_latency_ms=50",
    "market.providers.flaky.link.drop_prob=1.0",
    "market.fail_after=1",
    "trainer.max_steps=6",
    "trainer.ckpt_every=3",
    "trainer.keep_checkpoints=3",
    "trainer.threads=1",
]


def losses(run_dir) -> list[float]:
    return [event["train/loss"] for event in read_metrics(run_dir) if "train/loss" in event]


@pytest.mark.timeout(120)
def test_a_local_market_run_moves_experts_and_resumes_its_lease_book_identically(run_tiny, tmp_path):
    summary, run_dir = run_tiny(*MARKET)
    _, final = load_checkpoint(run_dir)
    holders = {lease[2] for lease in final["market"]["leases"]}
    assert holders == {"fast_cheap/0", "fast_cheap/1", "fast_dear/0", "fast_dear/1"}
    assert summary["market/moves"] == 2
    assert summary.get("market/share/flaky", 0.0) == 0.0  # dropped replies are not charged
    assert summary["market/cost"] > 0
    trained, _ = load_trained(run_dir)  # eval.py's rebuild puts the experts where the leases say
    try:
        assert sorted(trained.layers[0].pool.hosts) == [
            "fast_cheap-0",
            "fast_cheap-1",
            "fast_dear-0",
            "fast_dear-1",
        ]
    finally:
        trained.transport.close()

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir)
    keep_only_checkpoint(resumed_dir, 3)
    run_tiny(*MARKET, f"resume={resumed_dir}", name="unused")
    _, resumed = load_checkpoint(resumed_dir)
    assert resumed["market"] == final["market"]
    assert losses(resumed_dir) == losses(run_dir)


def test_answered_counts_and_measured_reply_times_feed_the_market():
    from types import SimpleNamespace

    import torch

    from experts.market import LeaseBook, MarketConfig, ProviderClassConfig, build_providers
    from moe.engine.market import answered_counts_E, measured_reply_ms

    pool = SimpleNamespace(
        num_experts=3, last_failures={1: "timeout"}, reply_time_E=torch.tensor([0.01, float("nan"), 0.03])
    )
    layer = SimpleNamespace(
        name="l0", pool=pool, evidence=None, last_plan=SimpleNamespace(counts=torch.tensor([4, 2, 5]))
    )
    assert answered_counts_E(layer).tolist() == [4, 0, 5]
    market = MarketConfig({"p": ProviderClassConfig(count=2, capacity=2)})
    book = LeaseBook(market, build_providers(market, seed=0), ["l0"], 3)  # p/0: experts 0, 1; p/1: 2
    assert measured_reply_ms([layer], book) == pytest.approx({"p/0": 10.0, "p/1": 30.0})  # NaN: not measured
