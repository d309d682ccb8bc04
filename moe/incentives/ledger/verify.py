"""Verifying a ledger: its chain, its signatures, its accounting and its anchors.

``verify_ledger`` walks the blocks in order and checks, for each: the height follows the last; the
stored hash equals the recomputed hash of the block's fields, its rows in every table and the previous
block's hash; the writer's signature of (height, hash) holds under the public key recorded at genesis;
and the replay (``replay.Replay``) rebuilds the block's emission, split, Yuma outcome, payouts and
submissions from what it records, and its compute payments from their tokens, prices and the
treasury's balance (``payments``). Then every balance must equal its replayed balance, the treasury's
its funding less every payment, ``Σ balances + burned == issuance + funded`` must hold, and every anchor
(``anchor``: checkpoints, summary.json) must name a block of this chain with the same hash, so a chain
cut back to an earlier block fails too. ``verify_run`` does all this for a run dir.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe.errors import LedgerError
from moe.incentives.ledger.anchor import LEDGER_FILE, Anchor, check_anchors, read_run_anchors
from moe.incentives.ledger.emission import TOKEN
from moe.incentives.ledger.epoch import TREASURY
from moe.incentives.ledger.replay import Replay
from moe.incentives.ledger.schema import (
    GENESIS_PREV_HASH,
    HASHED_TABLES,
    block_hash,
    connect_read_only,
    has_tables,
)
from moe.incentives.ledger.signing import block_message, signed_by


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify_ledger`` checked."""

    blocks: int
    epochs: int
    issuance: int
    burned: int
    accounts: int
    writer: str = ""
    anchors: int = 0
    funded: int = 0
    compute_paid: int = 0

    def __str__(self) -> str:
        anchors = (
            f"{self.anchors} anchored heads match"
            if self.anchors
            else "no anchored head checked (a ledger file alone cannot show that it was cut back)"
        )
        return (
            f"ok: {self.blocks} blocks, {self.epochs} epochs, issuance {self.issuance / TOKEN:.9f} tokens, "
            f"burned {self.burned / TOKEN:.9f}, {self.accounts} accounts, treasury funded "
            f"{self.funded / TOKEN:.9f}, compute paid {self.compute_paid / TOKEN:.9f}; signed by {self.writer}; "
            f"hashes, signatures, splits, payouts, payments, Yuma and Σ balances + burned == issuance + funded "
            f"hold; {anchors}"
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


def verify_run(path: str | os.PathLike[str], writer: str | None = None) -> VerifyReport:
    """Verify a run dir (its ledger.sqlite against the heads anchored in its checkpoints and summary.json,
    and the writer run_info.json names) or a ledger file alone."""
    path = Path(path)
    if not path.is_dir():
        return verify_ledger(path, writer=writer)
    anchors, named_writer = read_run_anchors(path)
    report = verify_ledger(path / LEDGER_FILE, anchors=anchors, writer=writer)
    if named_writer is not None and named_writer != report.writer:
        raise LedgerError(
            f"block 0: the ledger is signed by {report.writer}, run_info.json names {named_writer}"
        )
    return report


def verify_ledger(
    path: str | os.PathLike[str], anchors: Sequence[Anchor] = (), writer: str | None = None
) -> VerifyReport:
    """Verify the ledger at ``path`` (see the module docstring); raise ``LedgerError`` naming the first bad
    block. ``writer``: the public key that must have signed it (default: the one recorded at genesis)."""
    path = Path(path)
    conn = connect_read_only(path)
    try:
        conn.execute("BEGIN")  # one read snapshot, even while a writer is running
        if not has_tables(conn):
            if anchors:
                raise LedgerError(
                    f"block 0: missing: the ledger is empty but {anchors[0].source} anchors a head"
                )
            return VerifyReport(blocks=0, epochs=0, issuance=0, burned=0, accounts=0)
        report, replay, hashes = _verify_chain(conn, writer)
        _verify_balances(conn, replay, report.blocks)
        check_anchors(hashes, report.writer, anchors)
        return dataclasses.replace(report, anchors=len(anchors))
    except sqlite3.DatabaseError as error:
        raise LedgerError(f"ledger {path} cannot be read: {error}") from error
    finally:
        conn.close()


def _verify_chain(conn: sqlite3.Connection, writer: str | None) -> tuple[VerifyReport, Replay, list[str]]:
    tables = {table: _RowsByBlock(conn, table) for table in HASHED_TABLES}
    signer = _writer(conn, writer)
    hashes: list[str] = []
    replay: Replay | None = None
    for height, step, emission, issuance, burned, stored_prev, stored_hash, signature in conn.execute(
        "SELECT height, step, emission, issuance, burned, prev_hash, hash, signature FROM blocks ORDER BY height"
    ):
        if height != len(hashes):
            raise LedgerError(f"block {len(hashes)}: missing (the chain jumps to block {height})")
        rows = {table: grouped.take(height) for table, grouped in tables.items()}
        if stored_prev != (hashes[-1] if hashes else GENESIS_PREV_HASH):
            raise LedgerError(f"block {height}: previous-hash link broken")
        if block_hash(height, step, emission, issuance, burned, stored_prev, rows) != stored_hash:
            raise LedgerError(f"block {height}: hash mismatch, its content or one of its rows was changed")
        if not signed_by(signer, block_message(height, stored_hash), signature):
            raise LedgerError(f"block {height}: the writer's signature does not match the block")
        if replay is None:
            replay = Replay(conn, stored_hash)
            _check_genesis(emission, issuance, burned, rows, replay.funding)
        else:
            replay.check((height, step, emission, issuance, burned), rows)
        hashes.append(stored_hash)
    if replay is None:
        raise LedgerError("block 0: missing (the ledger has no genesis block)")
    for table, grouped in tables.items():
        if grouped.leftover_block() is not None:
            raise LedgerError(
                f"table {table} has rows for block {grouped.leftover_block()!r}, which is not in the chain"
            )
    num_accounts = conn.execute("SELECT COUNT(*) FROM accounts").fetchone()[0]
    report = VerifyReport(
        blocks=len(hashes) - 1,
        epochs=replay.epochs,
        issuance=replay.issuance,
        burned=replay.burned,
        accounts=num_accounts,
        writer=signer,
        funded=replay.funded,
        compute_paid=replay.compute_paid,
    )
    return report, replay, hashes


def _writer(conn: sqlite3.Connection, expected: str | None) -> str:
    """The writer's public key recorded at genesis; ``LedgerError`` when it is not the expected one."""
    found = conn.execute("SELECT hotkey FROM accounts WHERE name = 'owner'").fetchone()
    if found is None:
        raise LedgerError("block 0: the ledger has no owner account (the writer's public key)")
    if expected is not None and found[0] != expected.lower():
        raise LedgerError(
            f"block 0: the ledger is signed by {found[0]}, not by the expected writer {expected}"
        )
    return found[0]


def _check_genesis(
    emission: int, issuance: int, burned: int, rows: dict[str, list], funding: Sequence[tuple[Any, ...]]
) -> None:
    moved = [table for table, found in rows.items() if found and table not in ("meta", "accounts", "payouts")]
    if (emission, issuance, burned) != (0, 0, 0) or moved or sorted(rows["payouts"]) != sorted(funding):
        raise LedgerError(
            "block 0: the genesis block must not mint, burn, pay or record an epoch; it only funds the "
            "treasury with ledger.treasury"
        )


def _verify_balances(conn: sqlite3.Connection, replay: Replay, head: int) -> None:
    """Every stored balance equals its replayed balance, the treasury's its funding less the payments,
    and Σ balances + burned == issuance + funded."""
    (treasury,) = conn.execute("SELECT balance FROM accounts WHERE name = ?", (TREASURY,)).fetchone()
    if treasury != replay.funded - replay.compute_paid:
        raise LedgerError(
            f"block {head} (head): the treasury holds {treasury} units, but its funding {replay.funded} less "
            f"the payments {replay.compute_paid} leaves {replay.funded - replay.compute_paid}"
        )
    total = 0
    for account, name, balance in conn.execute("SELECT id, name, balance FROM accounts ORDER BY id"):
        expected = replay.balances.get(account, 0)
        if balance != expected:
            raise LedgerError(
                f"block {head} (head): invariant broken: account {name!r} (id {account}) has balance "
                f"{balance}, but its payouts sum to {expected}"
            )
        total += balance
    if total + replay.burned != replay.issuance + replay.funded:
        raise LedgerError(
            f"block {head} (head): invariant broken: Σ balances ({total}) + burned ({replay.burned}) "
            f"!= issuance ({replay.issuance}) + funded ({replay.funded})"
        )
