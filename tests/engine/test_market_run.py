"""A run with a compute market (`market=hetero`): experts move as leases change hands, charges are
counted, and a resumed run continues the lease book and the losses exactly."""

from __future__ import annotations

import shutil

import pytest

from moe.engine.checkpoint import load_checkpoint
from moe.engine.metrics import read_metrics
from tests.helpers import keep_only_checkpoint

# flaky providers qualify (slow_cheap's 160 ms round trip does not) and drop every reply: after one failed
# call the experts leave flaky/0 for flaky/1, then for fast_cheap/0, deterministically
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
    assert holders == {"fast_cheap/0"}
    assert summary["market/moves"] == 8  # 4 experts, twice
    assert summary["market/share/fast_cheap"] == 1.0  # dropped replies are not charged
    assert summary["market/cost"] > 0

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir)
    keep_only_checkpoint(resumed_dir, 3)
    run_tiny(*MARKET, f"resume={resumed_dir}", name="unused")
    _, resumed = load_checkpoint(resumed_dir)
    assert resumed["market"] == final["market"]
    assert losses(resumed_dir) == losses(run_dir)
