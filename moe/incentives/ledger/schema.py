"""The ledger's SQLite schema, how each row is written, and the hash that chains the blocks.

Tables: ``meta`` (config, subnets, seed), ``accounts`` (with their balances and public keys),
``blocks`` (with the writer's signature), ``payouts`` (every movement of units, signed amounts),
``epochs`` (pools, paid, carried, burned), ``epoch_values`` (consensus, incentive, dividends, validator
trust in units of 1e-9), ``weights`` (the u16 rows Yuma used, as on chain), ``bonds`` (1e-9),
``failures`` (per block and miner), ``audits`` (failed audits with their evidence), ``submissions`` (each
validator's signed weights, commit or reveal) and ``payments`` (compute paid from the treasury to
providers, per block, subnet, provider and price; ``payments.py``). Accounts are registered at genesis
(``registered_block`` 0) or, for providers, in the block of their first payment.

Each block's SHA-256 covers the block's fields, the previous block's hash and every row written in
that block in every table (rows of the genesis block: ``meta``, its ``accounts`` and the treasury's
funding in ``payouts``), so a change to any row breaks the chain; the writer signs (height, hash).
Account balances are not hashed; they are checked by replaying ``payouts``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from moe.errors import LedgerError

SCHEMA_VERSION = 4  # 4: the treasury and compute payments (issue 16)
GENESIS_PREV_HASH = "0" * 64

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID, STRICT;
CREATE TABLE accounts (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, role TEXT NOT NULL, subnet TEXT NOT NULL,
    idx INTEGER NOT NULL, behaviour TEXT NOT NULL, hotkey TEXT NOT NULL, registered_block INTEGER NOT NULL,
    balance INTEGER NOT NULL
) STRICT;
CREATE TABLE blocks (
    height INTEGER PRIMARY KEY, step INTEGER NOT NULL, emission INTEGER NOT NULL, issuance INTEGER NOT NULL,
    burned INTEGER NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL, signature TEXT NOT NULL
) STRICT;
CREATE TABLE payouts (
    block INTEGER NOT NULL, subnet TEXT NOT NULL, account INTEGER NOT NULL, reason TEXT NOT NULL,
    amount INTEGER NOT NULL, PRIMARY KEY (block, subnet, account, reason)
) WITHOUT ROWID, STRICT;
CREATE TABLE epochs (
    block INTEGER NOT NULL, subnet TEXT NOT NULL, epoch INTEGER NOT NULL, miner_pool INTEGER NOT NULL,
    miner_paid INTEGER NOT NULL, validator_pool INTEGER NOT NULL, validator_paid INTEGER NOT NULL,
    owner_paid INTEGER NOT NULL, carried INTEGER NOT NULL, burned INTEGER NOT NULL,
    dividends_by_stake INTEGER NOT NULL, PRIMARY KEY (block, subnet)
) WITHOUT ROWID, STRICT;
CREATE TABLE epoch_values (
    block INTEGER NOT NULL, subnet TEXT NOT NULL, kind TEXT NOT NULL, uid INTEGER NOT NULL,
    value INTEGER NOT NULL, PRIMARY KEY (block, subnet, kind, uid)
) WITHOUT ROWID, STRICT;
CREATE TABLE weights (
    block INTEGER NOT NULL, subnet TEXT NOT NULL, validator INTEGER NOT NULL, miner INTEGER NOT NULL,
    value INTEGER NOT NULL, PRIMARY KEY (block, subnet, validator, miner)
) WITHOUT ROWID, STRICT;
CREATE TABLE bonds (
    block INTEGER NOT NULL, subnet TEXT NOT NULL, validator INTEGER NOT NULL, miner INTEGER NOT NULL,
    value INTEGER NOT NULL, PRIMARY KEY (block, subnet, validator, miner)
) WITHOUT ROWID, STRICT;
CREATE TABLE failures (
    block INTEGER NOT NULL, subnet TEXT NOT NULL, miner INTEGER NOT NULL, failed INTEGER NOT NULL,
    failed_steps INTEGER NOT NULL, PRIMARY KEY (block, subnet, miner)
) WITHOUT ROWID, STRICT;
CREATE TABLE audits (
    block INTEGER NOT NULL, subnet TEXT NOT NULL, miner INTEGER NOT NULL, step INTEGER NOT NULL,
    kind TEXT NOT NULL, evidence TEXT NOT NULL, PRIMARY KEY (block, subnet, miner, step, kind)
) WITHOUT ROWID, STRICT;
CREATE TABLE submissions (
    block INTEGER NOT NULL, subnet TEXT NOT NULL, validator INTEGER NOT NULL, kind TEXT NOT NULL,
    digest TEXT NOT NULL, salt TEXT NOT NULL, signature TEXT NOT NULL,
    PRIMARY KEY (block, subnet, validator, kind)
) WITHOUT ROWID, STRICT;
CREATE TABLE payments (
    block INTEGER NOT NULL, subnet TEXT NOT NULL, provider TEXT NOT NULL, hotkey TEXT NOT NULL,
    tokens INTEGER NOT NULL, price_per_1k_units INTEGER NOT NULL, amount INTEGER NOT NULL,
    unpaid INTEGER NOT NULL, PRIMARY KEY (block, subnet, provider, price_per_1k_units)
) WITHOUT ROWID, STRICT;
"""

# Per table: the hashed columns, and the column that says which block wrote the row (None: block 0).
HASHED_TABLES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "meta": (("key", "value"), None),
    "accounts": (
        ("id", "name", "role", "subnet", "idx", "behaviour", "hotkey", "registered_block"),
        "registered_block",
    ),
    "payouts": (("block", "subnet", "account", "reason", "amount"), "block"),
    "epochs": (
        (
            "block",
            "subnet",
            "epoch",
            "miner_pool",
            "miner_paid",
            "validator_pool",
            "validator_paid",
            "owner_paid",
            "carried",
            "burned",
            "dividends_by_stake",
        ),
        "block",
    ),
    "epoch_values": (("block", "subnet", "kind", "uid", "value"), "block"),
    "weights": (("block", "subnet", "validator", "miner", "value"), "block"),
    "bonds": (("block", "subnet", "validator", "miner", "value"), "block"),
    "failures": (("block", "subnet", "miner", "failed", "failed_steps"), "block"),
    "audits": (("block", "subnet", "miner", "step", "kind", "evidence"), "block"),
    "submissions": (("block", "subnet", "validator", "kind", "digest", "salt", "signature"), "block"),
    "payments": (
        ("block", "subnet", "provider", "hotkey", "tokens", "price_per_1k_units", "amount", "unpaid"),
        "block",
    ),
}
ALL_TABLES = ("blocks", *HASHED_TABLES)
BLOCK_TABLES = tuple(table for table, (_, column) in HASHED_TABLES.items() if column == "block")


def create_tables(conn: sqlite3.Connection) -> None:
    """Create every table inside the caller's transaction.

    Statement by statement: ``executescript`` would commit and split the genesis transaction.
    """
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


def has_tables(conn: sqlite3.Connection) -> bool:
    """Whether the database holds a ledger; a partial set of tables is an error."""
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    present = names & set(ALL_TABLES)
    if present and present != set(ALL_TABLES):
        raise LedgerError(
            f"ledger is missing tables {sorted(set(ALL_TABLES) - present)}: damaged, or written by a "
            f"poimoe with another schema (this one reads schema {SCHEMA_VERSION})"
        )
    return bool(present)


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection in autocommit mode; ``LedgerError`` if the file does not exist."""
    if not path.exists():
        raise LedgerError(f"ledger {path} does not exist")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)


def insert_sql(table: str) -> str:
    """``INSERT`` of a row as the writer stores it: the hashed columns (plus the balance for accounts)."""
    columns = HASHED_TABLES[table][0]
    if table == "accounts":
        columns = (*columns, "balance")
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def _row_key(row: Sequence[Any]) -> str:
    return json.dumps(list(row), separators=(",", ":"))


def block_hash(
    height: int,
    step: int,
    emission: int,
    issuance: int,
    burned: int,
    prev_hash: str,
    rows: Mapping[str, Sequence[Sequence[Any]]],
) -> str:
    """SHA-256 of a block's canonical JSON: its fields, the previous hash and its rows in every table.

    Rows are sorted by their JSON text, so the hash does not depend on insertion or query order.
    """
    content = {
        "height": height,
        "step": step,
        "emission": emission,
        "issuance": issuance,
        "burned": burned,
        "prev_hash": prev_hash,
        "rows": {
            table: sorted((list(row) for row in rows.get(table, ())), key=_row_key) for table in HASHED_TABLES
        },
    }
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, or ``ROLLBACK`` on any exception (the connection is autocommit)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def acquire_writer_lock(path: Path) -> int:
    """Take an exclusive ``flock`` on ``PATH.lock``; the kernel drops it when the process dies."""
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LedgerError(
            f"ledger {path} is already open for writing by another process (pid {holder}); "
            "only one writer may hold a ledger"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def connect_for_writing(path: Path, synchronous: str) -> sqlite3.Connection:
    """An autocommit connection in WAL mode (readers see a consistent snapshot while the writer runs)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
    return conn
