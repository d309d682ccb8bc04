"""Reading a ledger (moe.incentives.ledger.verify, cli): tamper detection, `python -m moe.ledger`."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from moe.errors import LedgerError
from moe.ledger import TOKEN, iter_blocks, main, read_summary, verify_ledger
from tests.helpers import REPO
from tests.helpers.ledger_drivers import PROCESS_TIMEOUT_S, write_ledger


@pytest.fixture
def written_ledger(tmp_path: Path) -> Path:
    return write_ledger(tmp_path / "ledger.sqlite")


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
    # its first digit changed whatever it was: the hashes cover the session's fresh writer key (conftest), and
    # where block 7's began with 'f' (1 session in 16) the old 'f' || ... was a no-op
    "block hash": ("UPDATE blocks SET hash = (CASE substr(hash, 1, 1) WHEN 'f' THEN 'e' ELSE 'f' END) || "
                   "substr(hash, 2) WHERE height = 7", "block 7"),
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
    env = {**os.environ, "PYTHONPATH": str(REPO)}
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


def test_read_summary_and_iter_blocks_read_a_closed_ledger(written_ledger):
    summary = read_summary(written_ledger)
    assert (summary["blocks"], summary["epochs"], summary["issuance"]) == (30, 6, 30 * TOKEN)
    blocks = list(iter_blocks(written_ledger))
    assert [height for height, *_ in blocks] == list(range(31))
    assert blocks[-1] == (30, 60, TOKEN, 30 * TOKEN, 0)
    with pytest.raises(LedgerError, match="does not exist"):
        read_summary(written_ledger.with_name("missing.sqlite"))
