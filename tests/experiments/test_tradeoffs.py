"""The results page's `tradeoff` section (moe/experiments/tradeoffs.py), from hand-made runs with known answers."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from moe.experiments.comparison import JobRun
from moe.experiments.sweeps import Sweep
from moe.experiments.tradeoffs import TradeoffSpec, pareto_front, spent_curve, tradeoff_section

SPEC = TradeoffSpec(baseline=["market.latency_weight=0"], claim="2× throughput within 2 %")


def market_run(job: str, weight: float, seed: int, loss: float, tokens_per_s: float, cost: float) -> JobRun:
    seconds = 1000 / tokens_per_s
    events = [
        {"step": 0, "val/loss": 3.0},
        {"step": 10, "perf/sim_seconds": seconds / 2, "market/compute_cost": cost / 2},
        {"step": 10, "val/loss": (3.0 + loss) / 2},
        {"step": 20, "perf/sim_seconds": seconds, "market/compute_cost": cost},
        {"step": 20, "val/loss": loss},
    ]
    summary = {"val/loss": loss, "perf/sim_tokens_per_s": tokens_per_s, "market/compute_cost": cost}
    return JobRun(job, [f"market.latency_weight={weight:g}", f"seed={seed}"], summary, events)


def test_pareto_front_matches_a_brute_force_dominance_check():
    rng = random.Random(0)
    points = [(rng.random(), rng.random()) for _ in range(40)]
    dominated = {p for p, q in itertools.permutations(points, 2) if q[0] <= p[0] and q[1] <= p[1] and q != p}
    assert set(pareto_front(points)) == set(points) - dominated


def test_spent_curve_joins_each_value_with_what_was_spent_by_its_step():
    events = market_run("0", 0.0, 0, 2.0, 100.0, 8.0).events
    assert spent_curve(events, "val/loss", "market/compute_cost") == [(0.0, 3.0), (4.0, 2.5), (8.0, 2.0)]


def test_section_reports_speedup_loss_gap_and_verdict_per_policy(tmp_path):
    runs = [
        market_run("0", 0.0, 0, 2.00, 100.0, 10.0),
        market_run("1", 0.0, 1, 2.00, 100.0, 10.0),
        market_run("2", 3.0, 0, 2.02, 250.0, 9.0),  # 2.5× at +1 %: holds
        market_run("3", 3.0, 1, 2.02, 250.0, 9.0),
        market_run("4", 9.0, 0, 2.20, 400.0, 7.0),  # 4× at +10 %: fails on loss
    ]
    lines = tradeoff_section(Sweep(Path(tmp_path), "marketplace", runs), SPEC, "marketplace", tmp_path)
    text = "\n".join(lines)
    assert "| market.latency_weight=3 | 2.0200 ± 0.0000 | 250 ± 0 | 2.50× | +1.00 % | 9.00 ± 0.00 |" in text
    assert (
        "market.latency_weight=3: 2.50× the baseline's simulated tokens/s at +1.00 % val loss: the claim holds."
        in text
    )
    assert "market.latency_weight=9: 4.00×" in text
    assert "+10.00 % from the baseline's" in text
    assert "does NOT hold" in text
    assert (tmp_path / "marketplace_tradeoff.png").exists()


def test_section_without_a_baseline_row_says_so_and_gives_no_verdict(tmp_path):
    runs = [market_run("0", 3.0, 0, 2.0, 100.0, 10.0)]
    lines = tradeoff_section(Sweep(Path(tmp_path), "marketplace", runs), SPEC, "marketplace", tmp_path)
    assert "Baseline: none found" in lines
    assert not any("claim" in line for line in lines)
