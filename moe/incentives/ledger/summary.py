"""Reading a ledger without verifying it: the reward summary, per-block series and a CSV export."""

from __future__ import annotations

import csv
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moe.errors import LedgerError
from moe.incentives.ledger.anchor import head_of
from moe.incentives.ledger.audits import recorded_audits
from moe.incentives.ledger.emission import FIXED_ONE, TOKEN
from moe.incentives.ledger.payments import payments_summary
from moe.incentives.ledger.schema import ALL_TABLES, connect_read_only, has_tables


def summarise(conn: sqlite3.Connection) -> dict[str, Any]:
    """The reward summary of a ledger connection (see ``RewardLedger.summary``)."""
    if not has_tables(conn):
        empty = {"blocks": 0, "step": 0, "epochs": 0, "issuance": 0, "burned": 0}
        return {
            **empty,
            "issuance_tokens": 0.0,
            "burned_tokens": 0.0,
            "by_role": {},
            "by_behaviour": {},
            "last_epoch": {},
            "head": None,
            "audits": [],
            "payments": {"funded": 0, "treasury": 0, "paid": 0, "unpaid": 0, "by_provider": {}},
        }
    height, step, issuance, burned = conn.execute(
        "SELECT height, step, issuance, burned FROM blocks ORDER BY height DESC LIMIT 1"
    ).fetchone()
    by_role = {
        role: _amount(units)
        for role, units in conn.execute("SELECT role, SUM(balance) FROM accounts GROUP BY role ORDER BY role")
    }
    by_behaviour = {
        f"{role}/{behaviour}": _amount(units)
        for role, behaviour, units in conn.execute(
            "SELECT role, behaviour, SUM(balance) FROM accounts WHERE role IN ('miner', 'validator') "
            "GROUP BY role, behaviour ORDER BY role, behaviour"
        )
    }
    epochs = conn.execute("SELECT COUNT(DISTINCT block) FROM epochs").fetchone()[0]
    return {
        "blocks": height,
        "step": step,
        "epochs": epochs,
        "issuance": issuance,
        "issuance_tokens": issuance / TOKEN,
        "burned": burned,
        "burned_tokens": burned / TOKEN,
        "by_role": by_role,
        "by_behaviour": by_behaviour,
        "last_epoch": _last_epochs(conn),
        "head": head_of(conn),
        "audits": recorded_audits(conn),
        "payments": payments_summary(conn),
    }


def _amount(units: int) -> dict[str, Any]:
    return {"units": int(units), "tokens": units / TOKEN}


def _last_epochs(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """Per subnet, the last epoch's block, consensus and incentive per miner and dividends per validator
    (as fractions)."""
    last: dict[str, dict[str, Any]] = {}
    for subnet, block in conn.execute(
        "SELECT subnet, MAX(block) FROM epochs GROUP BY subnet ORDER BY subnet"
    ):
        entry: dict[str, Any] = {"block": block, "consensus": [], "incentive": [], "dividends": []}
        for kind, value in conn.execute(
            "SELECT kind, value FROM epoch_values WHERE block = ? AND subnet = ? "
            "AND kind IN ('consensus', 'incentive', 'dividends') ORDER BY kind, uid",
            (block, subnet),
        ):
            entry[kind].append(value / FIXED_ONE)
        last[subnet] = entry
    return last


def export_ledger(path: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Write one CSV per table into ``out_dir`` (default: ``<ledger stem>_csv`` next to it)."""
    path = Path(path)
    conn = connect_read_only(path)
    try:
        if not has_tables(conn):
            raise LedgerError(f"ledger {path} has no tables")
        out = Path(out_dir) if out_dir is not None else path.with_name(path.stem + "_csv")
        out.mkdir(parents=True, exist_ok=True)
        return [_export_table(conn, table, out / f"{table}.csv") for table in ALL_TABLES]
    finally:
        conn.close()


def _export_table(conn: sqlite3.Connection, table: str, target: Path) -> Path:
    cursor = conn.execute(f"SELECT * FROM {table}")
    with target.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(column[0] for column in cursor.description)
        writer.writerows(cursor)
    return target


def read_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The reward summary (see ``RewardLedger.summary``) of a ledger file, read-only."""
    conn = connect_read_only(Path(path))
    try:
        return summarise(conn)
    finally:
        conn.close()


def iter_blocks(path: str | os.PathLike[str]) -> Iterator[tuple[int, int, int, int, int]]:
    """Yield ``(height, step, emission, issuance, burned)`` per block, for reports and plots."""
    conn = connect_read_only(Path(path))
    try:
        yield from conn.execute("SELECT height, step, emission, issuance, burned FROM blocks ORDER BY height")
    finally:
        conn.close()
