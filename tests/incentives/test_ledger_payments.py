"""Compute payments in the ledger (moe.incentives.ledger.payments): the treasury, per-block payments
against a plain loop over the charges, exhaustion, the invariant, verify against tampering, resume,
`show`, the reward summary's `market/...` metrics and the eval report's section."""

from __future__ import annotations

import hashlib
import math
import sqlite3
from collections import defaultdict
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moe.errors import ConfigError, LedgerError
from moe.experiments.rewards_report import payments_lines
from moe.incentives.ledger.emission import TOKEN
from moe.incentives.rewards import compute_metrics, cost_per_bpb, run_ledger_config
from moe.ledger import RewardLedger, main, read_summary, verify_ledger
from tests.helpers.ledger_drivers import (
    SUBNETS,
    Charge,
    balances,
    block_hashes,
    failures_at,
    make_config,
    rehash_chain,
    score_view_at,
    tamper,
    writer_key,
)

# Units per 1,000 tokens processed; odd values, so flooring the block's sum (not each charge) matters.
PRICES = {"fast_cheap/0": 20_000_003, "fast_dear/0": 100_000_007, "flaky/0": 15_000_001, "late/0": 9_999_999}
HOTKEYS = {provider: hashlib.sha256(provider.encode()).hexdigest() for provider in PRICES}
LATE_FROM = 45  # late/0 is first charged (so registered) after the resume points below
RICH = 1000.0  # tokens: never runs out
POOR = 0.5  # tokens: runs out after a few blocks


def charges_at(step: int) -> list[Charge]:
    """Deterministic charges: every provider in every layer, fast_cheap/0 in two charges, flaky/0 at a
    price that changes within each block (two payments per block), late/0 from step LATE_FROM."""
    charges = []
    for j, layer in enumerate(SUBNETS):
        for k, (provider, price) in enumerate(PRICES.items()):
            if provider == "late/0" and step < LATE_FROM:
                continue
            if provider == "flaky/0":
                price += 1_000_000 * (step % 2)
            tokens = (step * 37 + j * 11 + k * 53) % 300  # 0 on some steps
            charges.append(Charge(provider, HOTKEYS[provider], layer, tokens, price))
            if provider == "fast_cheap/0":
                charges.append(Charge(provider, HOTKEYS[provider], layer, step % 7, price))
    return charges


def drive(ledger: RewardLedger, first: int, last: int, after_block=None) -> None:
    for step in range(first, last + 1):
        ledger.after_step(step, score_view_at(step), failures_at(step), charges=charges_at(step))
        if after_block is not None and step % 2 == 0:
            after_block()


def run_ledger(path: Path, last_step: int, treasury: float, after_block=None) -> Path:
    with RewardLedger(path, make_config(treasury=treasury), SUBNETS, seed=7) as ledger:
        drive(ledger, 1, last_step, after_block)
    return path


def reference_payments(last_step: int, funded: int) -> tuple[dict, int]:
    """The plain loop: per block, tokens summed per (layer, provider, price), paid in that order from
    what the treasury has left. Returns {(block, layer, provider, price): (tokens, paid, unpaid)} and
    the treasury's balance."""
    payments, treasury = {}, funded
    for block in range(1, last_step // 2 + 1):
        summed: dict[tuple[str, str, int], int] = defaultdict(int)
        for step in (2 * block - 1, 2 * block):
            for charge in charges_at(step):
                summed[(charge.layer, charge.provider, charge.price_per_1k_units)] += charge.tokens
        for (layer, provider, price), tokens in sorted(summed.items()):
            if tokens:
                due = tokens * price // 1000
                paid = min(due, treasury)
                treasury -= paid
                payments[(block, layer, provider, price)] = (tokens, paid, due - paid)
    return payments, treasury


def recorded(path: Path) -> dict:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT block, subnet, provider, price_per_1k_units, tokens, amount, unpaid FROM payments"
        ).fetchall()
    finally:
        conn.close()
    return {tuple(row[:4]): tuple(row[4:]) for row in rows}


def check_invariant(path: Path, funded: int) -> None:
    conn = sqlite3.connect(path)
    try:
        issuance, burned = conn.execute(
            "SELECT issuance, burned FROM blocks ORDER BY height DESC LIMIT 1"
        ).fetchone()
        total, lowest = conn.execute("SELECT SUM(balance), MIN(balance) FROM accounts").fetchone()
    finally:
        conn.close()
    assert total + burned == issuance + funded
    assert lowest >= 0


@pytest.mark.parametrize("treasury", [RICH, POOR])
def test_payments_match_a_plain_loop_and_the_invariant_holds_every_block(tmp_path, treasury):
    path, funded = tmp_path / "ledger.sqlite", round(treasury * TOKEN)
    run_ledger(path, 60, treasury, after_block=lambda: check_invariant(path, funded))
    expected, treasury_left = reference_payments(60, funded)
    assert recorded(path) == expected
    owed = defaultdict(int)
    for (_, _, provider, _), (_, paid, _) in expected.items():
        owed[f"provider/{provider}"] += paid
    found = balances(path)
    assert {name: units for name, units in found.items() if name.startswith("provider/")} == owed
    assert found["treasury"] == treasury_left
    unpaid = sum(row[2] for row in expected.values())
    if treasury == POOR:
        assert treasury_left == 0
        assert unpaid > 0
    else:
        assert unpaid == 0
        assert treasury_left > 0
    report = verify_ledger(path)
    assert (report.funded, report.compute_paid) == (funded, funded - treasury_left)
    payments = read_summary(path)["payments"]
    assert (payments["paid"], payments["unpaid"], payments["treasury"]) == (
        funded - treasury_left,
        unpaid,
        treasury_left,
    )


def test_flaky_provider_gets_one_payment_per_price_in_a_block(tmp_path):
    path = run_ledger(tmp_path / "ledger.sqlite", 4, RICH)
    flaky = sorted(
        key[3] for key in recorded(path) if key[0] == 1 and key[1] == "layer0" and key[2] == "flaky/0"
    )
    assert flaky == [15_000_001, 16_000_001]


@pytest.fixture(scope="module")
def paid_ledger(tmp_path_factory) -> Path:
    return run_ledger(tmp_path_factory.mktemp("payments") / "ledger.sqlite", 60, POOR)


@pytest.fixture
def ledger_copy(paid_ledger, tmp_path) -> Path:
    target = tmp_path / "ledger.sqlite"
    target.write_bytes(paid_ledger.read_bytes())
    return target


PAYMENT = "block = 3 AND subnet = 'layer1' AND provider = 'fast_dear/0'"
TAMPERS = {
    "amount": (f"UPDATE payments SET amount = amount + 1 WHERE {PAYMENT}", "block 3: the payment to provider fast_dear/0"),
    "tokens": (f"UPDATE payments SET tokens = tokens + 10 WHERE {PAYMENT}", "block 3: the payment to provider fast_dear/0"),
    "price": (f"UPDATE payments SET price_per_1k_units = 200000007 WHERE {PAYMENT}",
              "block 3: the payment to provider fast_dear/0"),
    "unpaid": (f"UPDATE payments SET unpaid = unpaid + 5 WHERE {PAYMENT}", "block 3: the payment to provider fast_dear/0"),
    "deleted": (f"DELETE FROM payments WHERE {PAYMENT}", "block 3: .* on provider/fast_dear/0 in subnet layer1"),
    "added": ("INSERT INTO payments VALUES (2, 'layer0', 'fast_dear/0', "
              f"'{HOTKEYS['fast_dear/0']}', 1000, 1000000, 1000000, 0)", "block 2: .* on provider/fast_dear/0 in subnet layer0"),
    "other key": (f"UPDATE payments SET hotkey = '{HOTKEYS['late/0']}' WHERE {PAYMENT}",
                  "block 3: provider fast_dear/0 is bound to key"),
}  # fmt: skip


def test_an_honest_ledger_verifies(ledger_copy):
    assert "compute paid" in str(verify_ledger(ledger_copy))


@pytest.mark.parametrize("edit", sorted(TAMPERS))
def test_a_tampered_payment_fails_verify_naming_block_and_provider(ledger_copy, edit):
    statement, message = TAMPERS[edit]
    tamper(ledger_copy, statement)
    with pytest.raises(LedgerError, match="block [23]: hash mismatch"):
        verify_ledger(ledger_copy)  # without the writer's key
    rehash_chain(ledger_copy, sign_with=writer_key())  # with it: the replay catches the payment
    with pytest.raises(LedgerError, match=message):
        verify_ledger(ledger_copy)


def test_a_tampered_treasury_or_funding_fails_verify(ledger_copy, tmp_path):
    tamper(ledger_copy, "UPDATE accounts SET balance = balance + 7 WHERE name = 'treasury'")
    with pytest.raises(LedgerError, match="treasury holds"):
        verify_ledger(ledger_copy)
    funded = tmp_path / "funded.sqlite"
    funded.write_bytes(ledger_copy.read_bytes())
    tamper(ledger_copy, "UPDATE payouts SET amount = amount * 2 WHERE block = 0 AND reason = 'fund'")
    rehash_chain(ledger_copy, sign_with=writer_key())
    with pytest.raises(LedgerError, match="block 0: .*funds the treasury"):
        verify_ledger(ledger_copy)


@pytest.mark.parametrize("resume_step", [40, 50])
def test_resume_with_charges_rebuilds_identical_blocks(tmp_path, resume_step):
    reference, resumed = tmp_path / "reference.sqlite", tmp_path / "resumed.sqlite"
    run_ledger(reference, 80, POOR)
    run_ledger(resumed, 66, POOR)  # overshoots the checkpoint; late/0 registered after step 40
    with RewardLedger(
        resumed, make_config(treasury=POOR), SUBNETS, seed=7, resume_step=resume_step
    ) as ledger:
        drive(ledger, resume_step + 1, 80)
    verify_ledger(resumed)
    assert block_hashes(resumed) == block_hashes(reference)
    assert balances(resumed) == balances(reference)


def test_charges_of_the_block_open_at_resume_are_not_paid(tmp_path):
    reference, resumed = tmp_path / "reference.sqlite", tmp_path / "resumed.sqlite"
    run_ledger(reference, 50, RICH)
    run_ledger(resumed, 50, RICH)
    with RewardLedger(resumed, make_config(treasury=RICH), SUBNETS, seed=7, resume_step=43) as ledger:
        drive(ledger, 44, 50)  # step 43's charges were never replayed
    verify_ledger(resumed)
    lost = sum(charge.tokens for charge in charges_at(43))
    tokens_of_block = {
        path: sum(row[0] for key, row in recorded(path).items() if key[0] == 22)
        for path in (reference, resumed)
    }
    assert tokens_of_block[reference] - tokens_of_block[resumed] == lost


def test_show_prints_the_treasury_and_the_payments(ledger_copy, capsys):
    assert main(["show", str(ledger_copy), "--payments", "-1"]) == 0
    shown = capsys.readouterr().out
    assert "compute payments: " in shown
    assert "treasury funded 0.500000000" in shown
    assert "provider/fast_dear/0" in shown
    assert "provider/late/0" in shown
    assert "block     3 step      6 layer1" in shown


@pytest.mark.parametrize(
    ("charge", "message"),
    [
        (Charge("fast_cheap/0", HOTKEYS["fast_cheap/0"], "layer9", 1, 1), "unknown subnet 'layer9'"),
        (Charge("fast_cheap/0", HOTKEYS["fast_cheap/0"], "layer0", -1, 1), "tokens=-1"),
        (Charge("fast_cheap/0", HOTKEYS["fast_cheap/0"], "layer0", 2.5, 1), "tokens=2.5"),
        (Charge("fast_cheap/0", HOTKEYS["fast_cheap/0"], "layer0", 1, -3), "price_per_1k_units=-3"),
        (Charge("", "", "layer0", 1, 1), "no provider"),
    ],
)
def test_bad_charges_are_refused_naming_the_value(tmp_path, charge, message):
    with (
        RewardLedger(tmp_path / "ledger.sqlite", make_config(), SUBNETS, seed=7) as ledger,
        pytest.raises(LedgerError, match=message),
    ):
        ledger.after_step(1, score_view_at(1), charges=[charge])


def test_a_provider_stays_bound_to_its_key_and_a_bad_step_adds_no_charge(tmp_path):
    path = tmp_path / "ledger.sqlite"
    other = Charge("fast_cheap/0", "ab" * 32, "layer0", 5, 1)
    with RewardLedger(path, make_config(treasury=RICH), SUBNETS, seed=7) as ledger:
        drive(ledger, 1, 2)
        with pytest.raises(LedgerError, match=f"provider fast_cheap/0 names key {'ab' * 32}; it is bound to"):
            ledger.after_step(3, score_view_at(3), charges=[*charges_at(3), other])
        drive(ledger, 3, 4)  # the refused step is retried; none of its charges was kept
    assert recorded(path) == reference_payments(4, round(RICH * TOKEN))[0]
    new = Charge("new/0", "ab" * 32, "layer0", 5, 1)
    with RewardLedger(tmp_path / "two.sqlite", make_config(treasury=RICH), SUBNETS, seed=7) as ledger:
        ledger.after_step(1, score_view_at(1), charges=[new])
        with pytest.raises(LedgerError, match="provider new/0 names key"):  # bound within the open block too
            ledger.after_step(2, score_view_at(2), charges=[Charge("new/0", "ef" * 32, "layer1", 5, 1)])


def test_treasury_config_is_checked_and_filled_from_the_market():
    for value in (-1.0, 1e-10, float("nan")):
        with pytest.raises(ConfigError, match="ledger.treasury"):
            run_ledger_config(OmegaConf.create({"ledger": {"treasury": value}}))
    assert run_ledger_config(OmegaConf.create({"ledger": {}})).treasury == 0.0
    cfg = OmegaConf.create({"ledger": {"tempo": 3}, "market": {"treasury": 12.5}})
    assert (run_ledger_config(cfg).treasury, run_ledger_config(cfg).tempo) == (12.5, 3)


def test_a_ledger_of_an_older_schema_is_refused_clearly(ledger_copy):
    tamper(ledger_copy, "DROP TABLE payments")
    with pytest.raises(LedgerError, match=r"missing tables \['payments'\].*schema 4"):
        RewardLedger(ledger_copy, make_config(treasury=POOR), SUBNETS, seed=7, resume_step=60)


def test_summary_metrics_and_report_section(ledger_copy):
    rewards = read_summary(ledger_copy)
    metrics = compute_metrics(rewards)
    by_provider = rewards["payments"]["by_provider"]
    assert set(by_provider) == set(PRICES)
    total = sum(p["paid"] + p["unpaid"] for p in by_provider.values()) / TOKEN
    assert metrics["market/compute_cost"] == pytest.approx(total)
    assert metrics["market/compute_cost"] > metrics["market/compute_paid"] == pytest.approx(POOR)
    assert sum(metrics[f"market/compute_cost/{p}"] for p in PRICES) == pytest.approx(total)
    assert compute_metrics({"payments": {"by_provider": {}}}) == {}
    lines = "\n".join(payments_lines(rewards["payments"]))
    assert "Compute payments: 0.500000 tokens paid" in lines
    assert "| provider/late/0 |" in lines


def test_cost_per_bpb():
    assert cost_per_bpb(3.0, 2.5, 1.0) == pytest.approx(2.0)
    assert cost_per_bpb(0.0, 2.5, 1.0) == 0.0
    for start, end in [(1.0, 1.0), (1.0, 1.5), (None, 1.0), (2.0, None), (float("nan"), 1.0)]:
        assert math.isnan(cost_per_bpb(3.0, start, end))


def test_show_lists_only_the_last_payments_unless_asked_for_all(ledger_copy, capsys):
    def payment_rows(*args: str) -> list[str]:
        assert main(["show", str(ledger_copy), *args]) == 0
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("  block ")]

    every = payment_rows("--payments", "-1")
    assert payment_rows("--payments", "2") == every[-2:]
    assert payment_rows("--payments", "0") == []
    assert len(every) > 2
