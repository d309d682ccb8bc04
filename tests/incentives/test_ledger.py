"""The ledger writer (moe.incentives.ledger.writer, epoch, validators): accounting and validator behaviours."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

from moe.errors import LedgerError
from moe.ledger import TOKEN, WEIGHT_MAX, RewardLedger, ValidatorSpec, verify_ledger
from tests.helpers.ledger_drivers import (
    SUBNETS,
    balances,
    failures_at,
    make_config,
    run_ledger,
    score_view_at,
    write_ledger,
)


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite"


@pytest.fixture
def written_ledger(ledger_path: Path) -> Path:
    return write_ledger(ledger_path)


# ---------------------------------------------------------------------------------------------------------
# Accounting


def test_conservation_over_many_epochs(ledger_path):
    cfg = make_config(steps_per_block=1, tempo=3, subnet_shares={"layer0": 3.0, "layer1": 1.0})
    with RewardLedger(ledger_path, cfg, SUBNETS, seed=1) as ledger:
        for step in range(1, 301):
            ledger.after_step(step, score_view_at(step), failures_at(step))
            if step % 50 == 0:
                summary = ledger.summary()
                total = sum(amount["units"] for amount in summary["by_role"].values())
                assert total + summary["burned"] == summary["issuance"] == step * TOKEN
    report = verify_ledger(ledger_path)
    assert (report.blocks, report.epochs, report.issuance) == (300, 100, 300 * TOKEN)
    owner = summary["by_role"]["owner"]["units"]
    assert owner == 300 * 18 * TOKEN // 100  # paid in full at every epoch; 300 is a multiple of tempo
    layer0_miners = sum(
        units for name, units in balances(ledger_path).items() if name.startswith("miner/layer0")
    )
    layer1_miners = sum(
        units for name, units in balances(ledger_path).items() if name.startswith("miner/layer1")
    )
    assert layer0_miners == pytest.approx(3 * layer1_miners, rel=1e-6)


def test_summary_reports_roles_behaviours_and_last_epoch(written_ledger):
    with RewardLedger(written_ledger, make_config(), SUBNETS, seed=7, resume_step=60) as ledger:
        summary = ledger.summary()
    assert (summary["blocks"], summary["epochs"], summary["issuance"]) == (30, 6, 30 * TOKEN)
    assert summary["issuance_tokens"] == 30.0
    assert set(summary["by_role"]) == {"owner", "miner", "validator", "pending", "treasury"}
    assert {"miner/honest", "miner/lazy", "validator/cabal", "validator/weight_copier"} <= set(
        summary["by_behaviour"]
    )
    assert (
        summary["by_behaviour"]["validator/honest"]["tokens"]
        > summary["by_behaviour"]["validator/random"]["tokens"]
    )
    last = summary["last_epoch"]["layer0"]
    assert (last["block"], len(last["consensus"])) == (30, 4)
    assert sum(last["incentive"]) == pytest.approx(1.0)


def test_no_usable_weights_burns_the_miner_pool_and_pays_validators_by_stake(ledger_path):
    cfg = make_config(validators=[ValidatorSpec(300.0, "honest"), ValidatorSpec(100.0, "honest")])
    subnets = {"layer0": ["honest", "honest"]}
    with RewardLedger(ledger_path, cfg, subnets, seed=0) as ledger:
        for step in range(1, 21):
            ledger.after_step(step, lambda validator: {"layer0": -torch.ones(2)})  # nobody helps
        summary = ledger.summary()
    assert summary["by_role"]["miner"]["units"] == 0
    assert summary["burned"] == 10 * TOKEN * 41 // 100
    validator_balances = balances(ledger_path)
    assert validator_balances["validator/0"] == 3 * validator_balances["validator/1"]
    verify_ledger(ledger_path)


def test_miner_that_failed_more_than_it_answered_gets_no_weight(ledger_path):
    cfg = make_config(steps_per_block=1, tempo=6, validators=[ValidatorSpec(1.0, "honest")])
    subnets = {"layer0": ["honest", "flaky", "crash"]}
    with RewardLedger(ledger_path, cfg, subnets, seed=0) as ledger:
        for step in range(1, 7):
            failures = {"layer0": torch.tensor([0, step % 2, 1])}  # flaky: 3 of 6 steps; crash: all 6
            ledger.after_step(step, lambda validator: {"layer0": torch.ones(3)}, failures)
    conn = sqlite3.connect(ledger_path)
    weights = dict(conn.execute("SELECT miner, value FROM weights WHERE block = 6"))
    conn.close()
    assert weights == {0: WEIGHT_MAX, 1: WEIGHT_MAX}  # failed == answered is not "more"
    assert balances(ledger_path)["miner/layer0/2"] == 0


def test_behaviours_copier_lazy_random_cabal(ledger_path):
    run_ledger(ledger_path, 30)  # epochs at blocks 5, 10, 15
    conn = sqlite3.connect(ledger_path)

    def row(block: int, validator: int, subnet: str = "layer0") -> list[int]:
        values = dict(
            conn.execute(
                "SELECT miner, value FROM weights WHERE block = ? AND subnet = ? AND validator = ?",
                (block, subnet, validator),
            )
        )
        return [values.get(miner, 0) for miner in range(len(SUBNETS[subnet]))]

    def consensus(block: int) -> list[int]:
        query = "SELECT value FROM epoch_values WHERE block = ? AND subnet = 'layer0' AND kind = 'consensus' ORDER BY uid"
        return [value for (value,) in conn.execute(query, (block,))]

    assert row(5, 1) == [0, 0, 0, WEIGHT_MAX]  # the cabal backs its miner only
    assert row(5, 4) == [0, 0, 0, 0]  # the copier has nothing to copy at the first epoch
    expected_copy = torch.round(
        torch.tensor(consensus(5), dtype=torch.float64) / max(consensus(5)) * WEIGHT_MAX
    )
    assert row(10, 4) == expected_copy.to(torch.int64).tolist()
    assert row(5, 3) == row(10, 3) == row(15, 3) != [0, 0, 0, 0]  # lazy: set once, never updated
    assert row(5, 2) != row(10, 2)  # random: fresh draws
    assert row(5, 0) != row(10, 0)  # honest: follows its view
    conn.close()


def test_minority_cabal_earns_its_miner_nothing_when_honest_validators_see_no_value(ledger_path):
    cfg = make_config(
        validators=[ValidatorSpec(0.6, "honest"), ValidatorSpec(0.4, "cabal", cabal_miners=[2])]
    )
    subnets = {"layer0": ["honest", "honest", "cabal"]}
    with RewardLedger(ledger_path, cfg, subnets, seed=0) as ledger:
        for step in range(1, 41):
            ledger.after_step(step, lambda validator: {"layer0": torch.tensor([1.0, 2.0, 0.0])})
    assert balances(ledger_path)["miner/layer0/2"] == 0
    assert balances(ledger_path)["miner/layer0/1"] > balances(ledger_path)["miner/layer0/0"] > 0


def test_steps_must_be_consecutive(ledger_path):
    with RewardLedger(ledger_path, make_config(), SUBNETS, seed=7) as ledger:
        ledger.after_step(1, score_view_at(1))
        with pytest.raises(LedgerError, match="expected step 2"):
            ledger.after_step(3, score_view_at(3))


def test_wrong_score_view_shape_is_a_clear_error(ledger_path):
    cfg = make_config(steps_per_block=1, tempo=1)
    with (
        RewardLedger(ledger_path, cfg, SUBNETS, seed=7) as ledger,
        pytest.raises(LedgerError, match="layer1"),
    ):
        ledger.after_step(1, lambda validator: {"layer0": torch.zeros(4)})


def test_random_validator_draws_from_the_run_seed(tmp_path):
    cfg = make_config(validators=[ValidatorSpec(1.0, "random")])

    def random_rows(path: Path, seed: int) -> list[tuple[int, ...]]:
        with RewardLedger(path, cfg, SUBNETS, seed=seed) as ledger:
            for step in range(1, 11):
                ledger.after_step(step, score_view_at(step))
        conn = sqlite3.connect(path)
        try:
            return conn.execute("SELECT * FROM weights ORDER BY block, subnet, validator, miner").fetchall()
        finally:
            conn.close()

    first = random_rows(tmp_path / "a.sqlite", seed=3)
    assert first == random_rows(tmp_path / "b.sqlite", seed=3)
    assert first != random_rows(tmp_path / "c.sqlite", seed=4)
