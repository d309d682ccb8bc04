"""Reward ledger: emission schedule, accounting, validator behaviours, tamper detection, kill and resume."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from moe.errors import ConfigError, LedgerError
from moe.ledger import (
    SUPPLY_CAP,
    TOKEN,
    WEIGHT_MAX,
    LedgerConfig,
    RewardLedger,
    ValidatorSpec,
    apportion,
    as_ledger_config,
    block_emission,
    main,
    verify_ledger,
)
from tests.helpers import REPO

REPO_ROOT = REPO
SUBNETS = {"layer0": ["honest", "honest", "lazy", "adversarial"], "layer1": ["honest", "noisy", "honest"]}
PROCESS_TIMEOUT_S = 60


# ---------------------------------------------------------------------------------------------------------
# Deterministic drivers (also run in child processes, so resumed and uninterrupted runs see the same data)


def make_config(**overrides) -> LedgerConfig:
    validators = [
        ValidatorSpec(stake=500.0, behaviour="honest"),
        ValidatorSpec(stake=200.0, behaviour="cabal", cabal_miners=[3]),
        ValidatorSpec(stake=150.0, behaviour="random"),
        ValidatorSpec(stake=100.0, behaviour="lazy"),
        ValidatorSpec(stake=50.0, behaviour="weight_copier"),
    ]
    return LedgerConfig(**{"steps_per_block": 2, "tempo": 5, "validators": validators, **overrides})


def score_view_at(step: int, subnets=SUBNETS):
    def view(validator: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(step * 1000 + validator)
        return {
            name: torch.randn(len(labels), generator=generator)
            + torch.arange(len(labels), dtype=torch.float32)
            for name, labels in subnets.items()
        }

    return view


def failures_at(step: int) -> dict[str, torch.Tensor]:
    return {"layer0": torch.tensor([0, int(step % 3 == 0), 0, 1]), "layer1": torch.zeros(3)}


def drive(ledger: RewardLedger, first: int, last: int) -> None:
    for step in range(first, last + 1):
        ledger.after_step(step, score_view_at(step), failures_at(step))


def run_forever(path: str) -> None:
    """Child process: write a ledger until killed."""
    ledger = RewardLedger(path, make_config(), SUBNETS, seed=7)
    for step in range(1, 10**7):
        ledger.after_step(step, score_view_at(step), failures_at(step))
        time.sleep(0.0005)


def try_second_writer(path: str) -> None:
    """Child process: try to open a ledger another process holds; exit 3 with the error."""
    try:
        RewardLedger(path, make_config(), SUBNETS, seed=7)
    except LedgerError as error:
        print(error)
        sys.exit(3)
    sys.exit(0)


@contextlib.contextmanager
def child_process(function: str, *args: str):
    """Run ``function(*args)`` from this module in a child process; always kill it on the way out."""
    code = f"import sys; import tests.incentives.test_ledger as t; t.{function}(*sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=PROCESS_TIMEOUT_S)
        process.stdout.close()


def block_count(path: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            return conn.execute("SELECT COUNT(*) FROM blocks").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def balances(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT name, balance FROM accounts"))
    finally:
        conn.close()


def block_hashes(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute("SELECT hash FROM blocks ORDER BY height")]
    finally:
        conn.close()


def run_ledger(path: Path, last_step: int, cfg: LedgerConfig | None = None, subnets=SUBNETS) -> dict:
    with RewardLedger(path, cfg or make_config(), subnets, seed=7) as ledger:
        for step in range(1, last_step + 1):
            ledger.after_step(
                step, score_view_at(step, subnets), failures_at(step) if subnets is SUBNETS else None
            )
        return ledger.summary()


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite"


@pytest.fixture
def written_ledger(ledger_path: Path) -> Path:
    run_ledger(ledger_path, 60)  # 30 blocks, 6 epochs
    return ledger_path


# ---------------------------------------------------------------------------------------------------------
# Emission schedule and integer splits


@pytest.mark.parametrize(
    ("issuance", "emission"),
    [
        (0, 10**9),
        (10_500_000 * TOKEN - 1, 10**9),
        (10_500_000 * TOKEN, 500_000_000),
        (15_750_000 * TOKEN, 250_000_000),
        (20_900_000 * TOKEN, 7_812_500),  # era 7: 21M − 20.9M = 0.1M ∈ (21M/2^8, 21M/2^7]
        (SUPPLY_CAP - 1, 0),
        (SUPPLY_CAP, 0),
        (SUPPLY_CAP + 5, 0),
    ],
)
def test_block_emission_schedule(issuance, emission):
    assert block_emission(issuance) == emission
    assert isinstance(block_emission(issuance), int)


def test_emission_halves_exactly_at_each_threshold():
    for era in range(1, 10):
        threshold = SUPPLY_CAP - SUPPLY_CAP // 2**era
        assert block_emission(threshold - 1) == TOKEN >> (era - 1)
        assert block_emission(threshold) == TOKEN >> era


@given(st.integers(0, 10**15), st.lists(st.integers(0, 10**9), min_size=1, max_size=6))
def test_apportion_is_exact(total, weights):
    parts = apportion(total, weights)
    assert sum(parts) == (total if any(weights) else 0)
    assert all(part >= 0 for part in parts)


# ---------------------------------------------------------------------------------------------------------
# Config


def test_yaml_defaults_match_the_dataclass():
    schema = OmegaConf.structured(LedgerConfig)
    from_yaml = OmegaConf.load(REPO_ROOT / "configs" / "ledger" / "default.yaml")
    from_yaml.pop("defaults")  # Hydra's schema line, not a ledger option
    merged = OmegaConf.merge(schema, from_yaml)
    assert OmegaConf.to_object(merged) == LedgerConfig()
    assert as_ledger_config(merged) == LedgerConfig()


def test_unknown_behaviour_is_a_config_error_listing_the_valid_names():
    with pytest.raises(ConfigError, match="weight_copier"):
        as_ledger_config(LedgerConfig(validators=[ValidatorSpec(behaviour="sneaky")]))
    with pytest.raises(ConfigError, match="cabal_miners"):
        as_ledger_config(LedgerConfig(validators=[ValidatorSpec(behaviour="cabal")]))
    with pytest.raises(ConfigError, match="yuma3"):
        as_ledger_config(LedgerConfig(liquid_alpha=[0.1, 0.3]))


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
    assert set(summary["by_role"]) == {"owner", "miner", "validator", "pending"}
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


# ---------------------------------------------------------------------------------------------------------
# Tamper detection and the CLI


def test_untouched_ledger_verifies(written_ledger):
    report = verify_ledger(written_ledger)
    assert (report.blocks, report.epochs, report.issuance, report.burned) == (30, 6, 30 * TOKEN, 0)


TAMPERS = {
    "payout amount": ("UPDATE payouts SET amount = amount + 1 WHERE block = 20 AND reason = 'incentive' "
                      "AND account = (SELECT MIN(account) FROM payouts WHERE block = 20 AND reason = 'incentive')",
                      "block 20: hash mismatch"),
    "payout deleted": ("DELETE FROM payouts WHERE block = 15 AND subnet = 'layer0' AND reason = 'dividend' "
                       "AND account = 1", "block 15"),
    "weight": ("UPDATE weights SET value = value - 1 WHERE block = 10 AND subnet = 'layer1' AND validator = 0 "
               "AND miner = 2", "block 10"),
    "bond": ("UPDATE bonds SET value = value + 1 WHERE block = 5 AND subnet = 'layer0' AND validator = 0 AND miner = "
             "(SELECT MIN(miner) FROM bonds WHERE block = 5 AND subnet = 'layer0' AND validator = 0)", "block 5"),
    "epoch carry": ("UPDATE epochs SET carried = carried + 1 WHERE block = 25 AND subnet = 'layer1'", "block 25"),
    "consensus": ("UPDATE epoch_values SET value = 0 WHERE block = 30 AND subnet = 'layer0' AND kind = 'consensus' "
                  "AND uid = 1", "block 30"),
    "failure count": ("UPDATE failures SET failed = failed + 1 WHERE block = 3 AND miner = 3", "block 3"),
    "block emission": ("UPDATE blocks SET emission = emission + 1 WHERE height = 12", "block 12"),
    "block hash": ("UPDATE blocks SET hash = 'f' || substr(hash, 2) WHERE height = 7", "block 7"),
    "block deleted": ("DELETE FROM blocks WHERE height = 9", "block 9"),
    "account behaviour": ("UPDATE accounts SET behaviour = 'honest' WHERE name = 'validator/1'", "block 0"),
    "account balance": ("UPDATE accounts SET balance = balance + 5 WHERE name = 'miner/layer0/1'", "miner/layer0/1"),
    "balance moved": ("UPDATE accounts SET balance = balance + (CASE name WHEN 'owner' THEN 5 ELSE -5 END) "
                      "WHERE name IN ('owner', 'validator/0')", "invariant broken"),
    "config": ("UPDATE meta SET value = '1' WHERE key = 'seed'", "block 0"),
    "orphan row": ("INSERT INTO payouts VALUES (999, 'layer0', 0, 'emission', 1)", "block 999"),
}  # fmt: skip


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_tampering_with_any_table_is_detected(written_ledger, tamper):
    statement, message = TAMPERS[tamper]
    conn = sqlite3.connect(written_ledger)
    with conn:
        assert conn.execute(statement).rowcount == 1 or tamper == "balance moved"
    conn.close()
    with pytest.raises(LedgerError, match=message):
        verify_ledger(written_ledger)


def test_cli_verify_exits_non_zero_naming_the_block(written_ledger, capsys):
    assert main(["verify", str(written_ledger)]) == 0
    assert "ok: 30 blocks" in capsys.readouterr().out
    conn = sqlite3.connect(written_ledger)
    with conn:
        conn.execute("UPDATE payouts SET amount = amount - 1 WHERE block = 10 AND reason = 'owner'")
    conn.close()
    command = [sys.executable, "-m", "moe.ledger", "verify", str(written_ledger)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    bad = subprocess.run(command, env=env, capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    assert bad.returncode == 1
    assert "block 10" in bad.stderr


def test_cli_show_and_export(written_ledger, tmp_path, capsys):
    assert main(["show", str(written_ledger)]) == 0
    shown = capsys.readouterr().out
    for expected in ("30 blocks", "validator/cabal", "miner/adversarial"):
        assert expected in shown
    assert main(["export", str(written_ledger), "--out", str(tmp_path / "csv")]) == 0
    payouts = (tmp_path / "csv" / "payouts.csv").read_text().splitlines()
    assert payouts[0] == "block,subnet,account,reason,amount"
    assert len(payouts) > 30
    assert {path.name for path in (tmp_path / "csv").iterdir()} >= {
        "blocks.csv",
        "accounts.csv",
        "epochs.csv",
    }
    assert main(["verify", str(tmp_path / "missing.sqlite")]) == 1


# ---------------------------------------------------------------------------------------------------------
# Single writer, resume, kill


def test_second_writer_in_this_process_is_refused(ledger_path):
    with (
        RewardLedger(ledger_path, make_config(), SUBNETS, seed=7),
        pytest.raises(LedgerError, match="already open for writing"),
    ):
        RewardLedger(ledger_path, make_config(), SUBNETS, seed=7)
    RewardLedger(ledger_path, make_config(), SUBNETS, seed=7).close()  # free again after close


@pytest.mark.timeout(PROCESS_TIMEOUT_S)
def test_second_writer_process_is_refused(ledger_path):
    with (
        RewardLedger(ledger_path, make_config(), SUBNETS, seed=7),
        child_process("try_second_writer", str(ledger_path)) as process,
    ):
        output, _ = process.communicate(timeout=PROCESS_TIMEOUT_S)
        assert process.returncode == 3, output
        assert f"already open for writing by another process (pid {os.getpid()})" in output


def test_reopening_without_resume_step_is_refused(written_ledger):
    with pytest.raises(LedgerError, match="resume_step"):
        RewardLedger(written_ledger, make_config(), SUBNETS, seed=7)


def test_resuming_with_other_settings_is_refused(written_ledger):
    with pytest.raises(LedgerError, match="different config"):
        RewardLedger(written_ledger, make_config(kappa=0.6), SUBNETS, seed=7, resume_step=60)
    with pytest.raises(LedgerError, match="different seed"):
        RewardLedger(written_ledger, make_config(), SUBNETS, seed=8, resume_step=60)


def test_resuming_past_the_ledger_is_refused(written_ledger):
    with pytest.raises(LedgerError, match="missing"):
        RewardLedger(written_ledger, make_config(), SUBNETS, seed=7, resume_step=70)


@pytest.mark.parametrize("resume_step", [40, 43, 50])
def test_resume_matches_an_uninterrupted_run(tmp_path, resume_step):
    reference, resumed = tmp_path / "reference.sqlite", tmp_path / "resumed.sqlite"
    run_ledger(reference, 80)
    run_ledger(resumed, 66)  # overshoots the checkpoint, as a crash after it would
    with RewardLedger(resumed, make_config(), SUBNETS, seed=7, resume_step=resume_step) as ledger:
        assert ledger.height == resume_step // 2
        drive(ledger, resume_step + 1, 80)
    verify_ledger(resumed)
    assert balances(resumed) == balances(reference)
    if resume_step % 2 == 0:  # no step of a half-open block was lost, so every block is identical
        assert block_hashes(resumed) == block_hashes(reference)


def _kill_writer_and_resume(tmp_path: Path, min_blocks: int) -> None:
    killed = tmp_path / "killed.sqlite"
    with child_process("run_forever", str(killed)) as process:
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while block_count(killed) < min_blocks:
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the writer made no progress"
            time.sleep(0.01)
        if min_blocks:
            verify_ledger(killed)  # a reader sees a consistent snapshot while the writer runs
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=PROCESS_TIMEOUT_S)
    # Killed before the file existed there is nothing to verify; the resumed run then starts it afresh.
    report_blocks = verify_ledger(killed).blocks if killed.exists() else 0
    last_step = report_blocks * 2
    resume_step = max(last_step - 5, 0)
    with RewardLedger(killed, make_config(), SUBNETS, seed=7, resume_step=resume_step) as ledger:
        drive(ledger, resume_step + 1, last_step + 10)
    reference = tmp_path / f"reference-{min_blocks}.sqlite"
    run_ledger(reference, last_step + 10)
    verify_ledger(killed)
    assert balances(killed) == balances(reference)


@pytest.mark.timeout(PROCESS_TIMEOUT_S)
def test_killed_writer_leaves_a_ledger_that_verifies_and_resumes(tmp_path):
    _kill_writer_and_resume(tmp_path, min_blocks=25)


@pytest.mark.slow
@pytest.mark.timeout(5 * PROCESS_TIMEOUT_S)
@pytest.mark.parametrize("min_blocks", [0, 1, 7, 64, 200])
def test_killed_at_many_instants(tmp_path, min_blocks):
    _kill_writer_and_resume(tmp_path, min_blocks)
