"""What a signed, anchored ledger proves (moe.incentives.ledger: signing, anchor, replay, verify).

Attacks on a finished ledger: with write access to the file only (edit rows, recompute the public
hashes), and with the writer's key too (re-sign everything): every edit fails `verify` naming its block.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from moe.errors import ConfigError, LedgerError
from moe.incentives.ledger.signing import validator_identity
from moe.ledger import RewardLedger, main, verify_ledger, verify_run
from tests.helpers.ledger_drivers import (
    SUBNETS,
    anchor_run_dir,
    drive,
    make_config,
    rehash_chain,
    tamper,
    write_ledger,
    writer_key,
)

# Epoch blocks (tempo 5) pay the owner, miners and validators.
FIRST_MINER = "(SELECT id FROM accounts WHERE name = 'miner/layer0/0')"


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return write_ledger(tmp_path / "ledger.sqlite")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run dir with a 60-step ledger whose head is anchored at steps 40 and 60 (checkpoints) and in
    summary.json."""
    run = tmp_path / "run"
    with RewardLedger(run / "ledger.sqlite", make_config(), SUBNETS, seed=7) as ledger:
        drive(ledger, 1, 40)
        anchor_run_dir(run, ledger, 40)
        drive(ledger, 41, 60)
        anchor_run_dir(run, ledger, 60)
    return run


def test_untouched_ledger_and_run_dir_verify(ledger, run_dir):
    assert verify_ledger(ledger).anchors == 0
    report = verify_run(run_dir)
    assert (report.blocks, report.epochs, report.anchors) == (30, 6, 3)
    assert report.writer == writer_key().hotkey


# ------------------------------------------------------------------------------- without the writer's key


def test_edited_balance_fails_naming_the_head_block(ledger):
    tamper(ledger, "UPDATE accounts SET balance = balance + 7 WHERE name = 'miner/layer0/2'")
    with pytest.raises(LedgerError, match=r"block 30 \(head\): .*miner/layer0/2"):
        verify_ledger(ledger)


def test_edited_payout_with_hashes_recomputed_fails_at_its_block(ledger):
    tamper(
        ledger,
        f"UPDATE payouts SET amount = amount + 1000 WHERE block = 15 AND account = {FIRST_MINER}",
        f"UPDATE accounts SET balance = balance + 1000 WHERE id = {FIRST_MINER}",
    )
    rehash_chain(ledger)
    with pytest.raises(LedgerError, match="block 15: the writer's signature does not match"):
        verify_ledger(ledger)


def test_moved_owner_share_with_hashes_recomputed_fails_at_its_block(ledger):
    tamper(ledger, *_move_owner_share(20))
    rehash_chain(ledger)
    with pytest.raises(LedgerError, match="block 20: the writer's signature does not match"):
        verify_ledger(ledger)


def test_truncated_chain_fails_against_the_anchored_head(run_dir):
    ledger = run_dir / "ledger.sqlite"
    _truncate(ledger, keep=24)
    verify_ledger(ledger)  # the cut chain is consistent in itself ...
    with pytest.raises(LedgerError, match=r"block 25: missing: the chain ends at block 24 .*truncated"):
        verify_run(run_dir)  # ... but the checkpoints and summary.json remember a longer one


def test_truncation_below_one_anchor_is_caught_by_the_other(run_dir):
    ledger = run_dir / "ledger.sqlite"
    (run_dir / "summary.json").unlink()
    (run_dir / "checkpoints" / "step_0000060.pt").unlink()  # the cutter removed the newer anchors ...
    _truncate(ledger, keep=12)
    with pytest.raises(LedgerError, match="block 13: missing"):  # ... the step-40 checkpoint is left
        verify_run(run_dir)


def test_emptied_ledger_and_malformed_anchors_fail(run_dir):
    (run_dir / "ledger.sqlite").unlink()
    sqlite3.connect(run_dir / "ledger.sqlite").close()  # an empty database in its place
    with pytest.raises(LedgerError, match="block 0: missing: the ledger is empty"):
        verify_run(run_dir)
    (run_dir / "summary.json").write_text('{"rewards": {"head": {"height": -1}}}')
    with pytest.raises(LedgerError, match="summary.json: the anchored ledger head is malformed"):
        verify_run(run_dir)


# --------------------------------------------------------------------- with the writer's key (re-signing)


def test_moved_owner_share_re_signed_fails_the_recomputed_split(ledger):
    tamper(ledger, *_move_owner_share(20))
    rehash_chain(ledger, sign_with=writer_key())
    with pytest.raises(LedgerError, match=r"block 20: payouts records .*replay"):
        verify_ledger(ledger)


def test_emission_split_changed_and_re_signed_fails(ledger):
    owner, miners = (
        "(SELECT id FROM accounts WHERE name = 'pending/layer0/owner')",
        "(SELECT id FROM accounts WHERE name = 'pending/layer0/miners')",
    )
    tamper(
        ledger,
        f"UPDATE payouts SET amount = amount + 5 WHERE block = 3 AND account = {owner} AND reason = 'emission'",
        f"UPDATE payouts SET amount = amount - 5 WHERE block = 3 AND account = {miners} AND reason = 'emission'",
    )  # fmt: skip
    rehash_chain(ledger, sign_with=writer_key())
    with pytest.raises(LedgerError, match=r"block 3: payouts records \(3, 'layer0'"):
        verify_ledger(ledger)


def test_incentive_changed_and_re_signed_fails_the_recomputed_yuma(ledger):
    tamper(
        ledger,
        "UPDATE epoch_values SET value = value + 1 WHERE block = 25 AND subnet = 'layer1' AND kind = 'incentive' "
        "AND uid = 0",
    )
    rehash_chain(ledger, sign_with=writer_key())
    with pytest.raises(LedgerError, match=r"block 25: epoch_values records \(25, 'layer1', 'incentive', 0"):
        verify_ledger(ledger)


def test_weights_changed_and_re_signed_fail_the_validators_signature(ledger):
    tamper(
        ledger,
        "UPDATE weights SET value = 1 WHERE block = 10 AND subnet = 'layer0' AND validator = 1 AND miner = 3",
    )
    rehash_chain(ledger, sign_with=writer_key())
    with pytest.raises(LedgerError, match="block 10: subnet 'layer0': validator 1's weights signature"):
        verify_ledger(ledger)


def test_history_rewritten_with_the_key_fails_against_the_anchors(run_dir):
    """A key holder can rewrite a consistent history; only the anchors taken earlier show it."""
    ledger = run_dir / "ledger.sqlite"
    tamper(ledger, "UPDATE failures SET failed = failed + 1 WHERE block = 23 AND miner = 3")  # an input
    rehash_chain(ledger, sign_with=writer_key())
    verify_ledger(ledger)
    with pytest.raises(LedgerError, match="block 30: its hash differs from the head anchored in"):
        verify_run(run_dir)


def test_ledger_signed_by_another_key_is_refused(ledger, tmp_path, capsys):
    stranger = tmp_path / "stranger.pub"
    stranger.write_text(validator_identity(writer_key(), 0, 0).hotkey + "\n")
    assert main(["verify", str(ledger), "--writer", str(stranger)]) == 1
    assert "block 0: the ledger is signed by" in capsys.readouterr().err
    assert main(["verify", str(ledger), "--writer", writer_key().hotkey]) == 0


# --------------------------------------------------------------------------------------- keys and resume


def test_writer_key_lives_outside_the_run_dir(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="inside the run dir"):
        RewardLedger(run / "ledger.sqlite", make_config(keys_dir=str(run / "keys")), SUBNETS, seed=7)
    keys = tmp_path / "keys"
    with RewardLedger(run / "ledger.sqlite", make_config(keys_dir=str(keys)), SUBNETS, seed=7) as ledger:
        drive(ledger, 1, 10)
    key_file = keys / "ledger_writer.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    secret = key_file.read_text().strip().encode()
    assert not any(secret in path.read_bytes() for path in run.rglob("*") if path.is_file())


def test_resuming_with_another_writer_key_is_refused(tmp_path):
    path = tmp_path / "run" / "ledger.sqlite"
    run_with = make_config(keys_dir=str(tmp_path / "keys_a"))
    with RewardLedger(path, run_with, SUBNETS, seed=7) as ledger:
        drive(ledger, 1, 10)
    with pytest.raises(LedgerError, match="resume with the key that started the run"):
        RewardLedger(path, make_config(keys_dir=str(tmp_path / "keys_b")), SUBNETS, seed=7, resume_step=10)


def test_resume_refuses_a_checkpoint_whose_head_is_not_in_the_chain(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with RewardLedger(path, make_config(), SUBNETS, seed=7) as ledger:
        drive(ledger, 1, 20)
        state = ledger.checkpoint_state()
    forged = {**state, "head": {**state["head"], "hash": "0" * 64}}
    with pytest.raises(LedgerError, match="block 10 is not the head anchored in the checkpoint"):
        RewardLedger(path, make_config(), SUBNETS, seed=7, resume_step=20, checkpoint_state=forged)
    RewardLedger(path, make_config(), SUBNETS, seed=7, resume_step=20, checkpoint_state=state).close()


def _move_owner_share(block: int) -> tuple[str, ...]:
    """Pay the block's owner payouts to miner 0 of layer0 instead (balances moved along)."""
    owner_payout = f"block = {block} AND reason = 'owner'"
    moved = f"(SELECT SUM(amount) FROM payouts WHERE {owner_payout})"
    return (
        f"UPDATE accounts SET balance = balance + {moved} WHERE id = {FIRST_MINER}",
        f"UPDATE accounts SET balance = balance - {moved} WHERE name = 'owner'",
        f"UPDATE payouts SET account = {FIRST_MINER} WHERE {owner_payout}",
    )


def _truncate(ledger: Path, keep: int) -> None:
    conn = sqlite3.connect(ledger)
    with conn:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            column = {"blocks": "height", "accounts": None, "meta": None}.get(table, "block")
            if column:
                conn.execute(f"DELETE FROM {table} WHERE {column} > ?", (keep,))
        replayed = dict(conn.execute("SELECT account, SUM(amount) FROM payouts GROUP BY account"))
        for (account,) in conn.execute("SELECT id FROM accounts").fetchall():
            conn.execute("UPDATE accounts SET balance = ? WHERE id = ?", (replayed.get(account, 0), account))
    conn.close()
