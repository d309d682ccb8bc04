"""A training run whose ledger is charged for compute: the run summary's `market/compute_cost` and
`market/cost_per_bpb`, the eval report's compute payments, and `verify` of the run dir. Part M1's lease
book is not needed here: the ledger's `after_step` is wrapped to add a fixed charge per step and layer."""

from __future__ import annotations

import json
import math
import sqlite3

import pytest

from moe.engine.metrics import METRICS_FILE
from moe.experiments.run_report import write_run_report
from moe.ledger import LEDGER_FILE, TOKEN, RewardLedger, verify_run
from tests.helpers.ledger_drivers import Charge

PRICE = 20_000_000  # units per 1k tokens processed: 0.02 tokens
KEY = "cd" * 32


def test_a_charged_run_reports_its_cost_per_bit_per_byte_and_the_report_lists_payments(run_tiny, monkeypatch):
    after_step = RewardLedger.after_step

    def charged(self, step, score_view, failures=None, audits=(), charges=()):
        extra = [Charge("sim/0", KEY, subnet, 100 * step, PRICE) for subnet in self._subnet_names]
        return after_step(self, step, score_view, failures, audits, charges=[*charges, *extra])

    monkeypatch.setattr(RewardLedger, "after_step", charged)
    summary, run_dir = run_tiny("ledger.treasury=1.0")
    tokens = summary["rewards"]["payments"]["by_provider"]["sim/0"]["tokens"]
    conn = sqlite3.connect(run_dir / LEDGER_FILE)
    (subnets,) = conn.execute("SELECT COUNT(DISTINCT subnet) FROM payments").fetchone()
    conn.close()
    assert tokens == 100 * sum(range(1, summary["step"] + 1)) * subnets
    assert summary["market/compute_cost"] == pytest.approx(tokens * PRICE // 1000 / TOKEN)
    assert summary["market/compute_cost/sim/0"] == summary["market/compute_cost"]
    logged = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    spent = [e["market/compute_cost"] for e in logged if "market/compute_cost" in e]  # a cumulative series
    assert spent == sorted(spent)
    assert spent[-1] == summary["market/compute_cost"]
    start = next(e["val/bpb"] for e in logged if e["step"] == 0 and "val/bpb" in e)
    improvement = start - summary["val/bpb"]
    if improvement > 0:
        assert summary["market/cost_per_bpb"] == pytest.approx(summary["market/compute_cost"] / improvement)
    else:
        assert math.isnan(summary["market/cost_per_bpb"])
    assert verify_run(run_dir).compute_paid == round(summary["market/compute_cost"] * TOKEN)
    write_run_report(run_dir)
    report = (run_dir / "report.md").read_text()
    assert "Compute payments: " in report
    assert "| provider/sim/0 |" in report
