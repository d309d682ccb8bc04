"""Reading a ledger: the reward summary, the full verification, per-block series and a CSV export.

``verify_ledger`` recomputes the hash chain and the emission schedule block by block and replays the
``payouts`` table (every movement of units) against the account balances, so a change to any row, or
a balance that does not follow from the payouts, is found and named.
"""

from __future__ import annotations

import csv
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe.errors import LedgerError
from moe.incentives.ledger.emission import FIXED_ONE, TOKEN, block_emission
from moe.incentives.ledger.schema import (
    ALL_TABLES,
    GENESIS_PREV_HASH,
    HASHED_TABLES,
    block_hash,
    connect_read_only,
    has_tables,
)


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
    }


def _amount(units: int) -> dict[str, Any]:
    return {"units": int(units), "tokens": units / TOKEN}


def _last_epochs(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """Per subnet, the last epoch's block, consensus and incentive per miner (as fractions)."""
    last: dict[str, dict[str, Any]] = {}
    for subnet, block in conn.execute(
        "SELECT subnet, MAX(block) FROM epochs GROUP BY subnet ORDER BY subnet"
    ):
        entry: dict[str, Any] = {"block": block, "consensus": [], "incentive": []}
        for kind, value in conn.execute(
            "SELECT kind, value FROM epoch_values WHERE block = ? AND subnet = ? AND kind IN ('consensus', 'incentive') "
            "ORDER BY kind, uid",
            (block, subnet),
        ):
            entry[kind].append(value / FIXED_ONE)
        last[subnet] = entry
    return last


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify_ledger`` checked."""

    blocks: int
    epochs: int
    issuance: int
    burned: int
    accounts: int

    def __str__(self) -> str:
        return (
            f"ok: {self.blocks} blocks, {self.epochs} epochs, issuance {self.issuance / TOKEN:.9f} tokens, "
            f"burned {self.burned / TOKEN:.9f}, {self.accounts} accounts; chain and Σ balances + burned == issuance hold"
        )


class _RowsByBlock:
    """Iterate one table's rows grouped by the block that wrote them, in block order."""

    def __init__(self, conn: sqlite3.Connection, table: str) -> None:
        columns, block_column = HASHED_TABLES[table]
        self.table = table
        order = block_column or "1"
        self._rows = conn.execute(f"SELECT {', '.join(columns)}, {order} FROM {table} ORDER BY {order}")
        self._pending = next(self._rows, None)

    def take(self, height: int) -> list[tuple[Any, ...]]:
        """Rows of block ``height``; rows of an earlier, non-existent block are an error."""
        rows = []
        while self._pending is not None and _block_of(self._pending, self.table) <= height:
            block = _block_of(self._pending, self.table)
            if block != height:
                raise LedgerError(
                    f"table {self.table} has rows for block {block!r}, which is not in the chain"
                )
            rows.append(self._pending[:-1])
            self._pending = next(self._rows, None)
        return rows

    def leftover_block(self) -> Any:
        return None if self._pending is None else self._pending[-1]


def _block_of(row: tuple[Any, ...], table: str) -> int:
    block = row[-1] if HASHED_TABLES[table][1] else 0
    if not isinstance(block, int):
        raise LedgerError(f"table {table} has a row with a non-integer block {block!r}")
    return block


def verify_ledger(path: str | os.PathLike[str]) -> VerifyReport:
    """Recompute the hash chain, the schedule and the invariant; raise ``LedgerError`` on the first fault.

    Checks, block by block: heights are contiguous from 0; the stored hash equals the recomputed hash of
    the block's fields, its rows in every table and the previous block's hash; emission follows the
    schedule; issuance and burned add up; the block's payouts equal its emission minus its burns.
    Then every account's balance equals the sum of its payouts, and Σ balances + burned == issuance.
    """
    path = Path(path)
    conn = connect_read_only(path)
    try:
        conn.execute("BEGIN")  # one read snapshot, even while a writer is running
        if not has_tables(conn):
            return VerifyReport(blocks=0, epochs=0, issuance=0, burned=0, accounts=0)
        report = _verify_chain(conn)
        _verify_balances(conn, report)
        return report
    except sqlite3.DatabaseError as error:
        raise LedgerError(f"ledger {path} cannot be read: {error}") from error
    finally:
        conn.close()


def _verify_chain(conn: sqlite3.Connection) -> VerifyReport:
    tables = {table: _RowsByBlock(conn, table) for table in HASHED_TABLES}
    prev_hash, issuance, burned, expected_height, epochs = GENESIS_PREV_HASH, 0, 0, 0, 0
    for height, step, emission, block_issuance, block_burned, stored_prev, stored_hash in conn.execute(
        "SELECT height, step, emission, issuance, burned, prev_hash, hash FROM blocks ORDER BY height"
    ):
        if height != expected_height:
            raise LedgerError(f"block {expected_height}: missing (the chain jumps to block {height})")
        rows = {table: grouped.take(height) for table, grouped in tables.items()}
        if stored_prev != prev_hash:
            raise LedgerError(f"block {height}: previous-hash link broken")
        if block_hash(height, step, emission, block_issuance, block_burned, stored_prev, rows) != stored_hash:
            raise LedgerError(f"block {height}: hash mismatch, its content or one of its rows was changed")
        _check_block_amounts(
            height, emission, issuance, burned, block_issuance, block_burned, rows["payouts"]
        )
        prev_hash, issuance, burned, expected_height = stored_hash, block_issuance, block_burned, height + 1
        epochs += bool(rows["epochs"])
    if expected_height == 0:
        raise LedgerError("block 0: missing (the ledger has no genesis block)")
    for table, grouped in tables.items():
        if grouped.leftover_block() is not None:
            raise LedgerError(
                f"table {table} has rows for block {grouped.leftover_block()!r}, which is not in the chain"
            )
    num_accounts = conn.execute("SELECT COUNT(*) FROM accounts").fetchone()[0]
    return VerifyReport(
        blocks=expected_height - 1, epochs=epochs, issuance=issuance, burned=burned, accounts=num_accounts
    )


def _check_block_amounts(
    height: int,
    emission: int,
    prev_issuance: int,
    prev_burned: int,
    issuance: int,
    burned: int,
    payouts: Sequence[tuple[Any, ...]],
) -> None:
    if height == 0:
        if (emission, issuance, burned) != (0, 0, 0) or payouts:
            raise LedgerError("block 0: the genesis block must not mint, burn or pay")
        return
    if emission != block_emission(prev_issuance):
        raise LedgerError(
            f"block {height}: emission {emission} breaks the schedule ({block_emission(prev_issuance)})"
        )
    if issuance != prev_issuance + emission:
        raise LedgerError(
            f"block {height}: issuance {issuance} != previous {prev_issuance} + emission {emission}"
        )
    burns = -sum(row[4] for row in payouts if row[3] == "burn")
    moved = sum(row[4] for row in payouts)
    if burned < prev_burned or moved != emission - (burned - prev_burned) or burns > burned - prev_burned:
        raise LedgerError(f"block {height}: payouts ({moved}) do not equal emission ({emission}) minus burns")


def _verify_balances(conn: sqlite3.Connection, report: VerifyReport) -> None:
    replayed = dict(conn.execute("SELECT account, SUM(amount) FROM payouts GROUP BY account"))
    total = 0
    known = set()
    for account, name, balance in conn.execute("SELECT id, name, balance FROM accounts ORDER BY id"):
        known.add(account)
        expected = replayed.get(account, 0)
        if balance != expected:
            raise LedgerError(
                f"invariant broken: account {name!r} (id {account}) has balance {balance}, "
                f"but its payouts sum to {expected}"
            )
        if balance < 0:
            raise LedgerError(
                f"invariant broken: account {name!r} (id {account}) has a negative balance {balance}"
            )
        total += balance
    strangers = sorted(set(replayed) - known)
    if strangers:
        raise LedgerError(f"invariant broken: payouts to accounts that do not exist: {strangers}")
    if total + report.burned != report.issuance:
        raise LedgerError(
            f"invariant broken: Σ balances ({total}) + burned ({report.burned}) != issuance ({report.issuance})"
        )


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
