"""The ledger writer: one run's ``RewardLedger`` opens (or resumes) the file and closes a block per step group.

Every ``steps_per_block`` training steps it closes a block: it mints ``block_emission(issuance)`` units,
splits them over subnets (one per MoE layer) and, within a subnet, over the owner, miner and validator
pools (exactly, by largest remainder), which accrue as pending balances. Every ``tempo`` blocks each
subnet runs an epoch (``epoch.run_epoch``) that pays the pending pools. Each block is written in one
transaction; invariant at every block: ``Σ balances + burned == issuance`` (pending pools are accounts).

Accounts: ``owner``, ``validator/<i>`` (shared by all subnets), ``miner/<subnet>/<j>`` and the pending
pools ``pending/<subnet>/{owner,miners,validators}``.

Shape legend: V = validators, M = miners of one subnet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from moe.errors import ConfigError, LedgerError
from moe.incentives.ledger.config import RUNTIME_ONLY_FIELDS, LedgerConfig, as_ledger_config
from moe.incentives.ledger.emission import FIXED_ONE, apportion, block_emission, fraction_weights
from moe.incentives.ledger.epoch import POOLS, BlockDraft, CachedViews, ScoreView, SubnetState, run_epoch
from moe.incentives.ledger.schema import (
    BLOCK_TABLES,
    GENESIS_PREV_HASH,
    SCHEMA_VERSION,
    block_hash,
    create_tables,
    has_tables,
    insert_sql,
)
from moe.incentives.ledger.verify import summarise

logger = logging.getLogger(__name__)


class RewardLedger:
    """Writes the reward ledger of one run; see the module docstring. ``RewardLedger(path, …)`` opens it.

    Failure rule: over an epoch, a miner whose failure count exceeds the number of steps it answered
    (steps with no failure) gets zero weight from honest (and first-time lazy) validators for that epoch.

    Resume: blocks closed after ``resume_step`` are dropped and the run's later ``after_step`` calls
    rebuild them. Steps of a block that was still open at ``resume_step`` are not replayed by the trainer,
    so their failure counts are lost; with checkpoints on block boundaries a resumed run is bit-identical
    (same block hashes) to an uninterrupted one. Call ``after_step`` before saving the checkpoint of a
    step, so that a checkpoint never runs ahead of the ledger.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        cfg: LedgerConfig | Mapping[str, Any],
        subnets: Mapping[str, Sequence[str]],
        seed: int,
        resume_step: int | None = None,
    ) -> None:
        """Open (or create) the ledger at ``path`` for writing.

        ``subnets`` maps each MoE layer to one behaviour label per miner (expert). A new file gets a
        genesis block. An existing one needs ``resume_step`` (the step of the checkpoint the run resumes
        from): blocks closed after that step are rolled back, so the run continues with no gap and no
        duplicate. The file is locked against a second writer until ``close``.
        """
        self._cfg = as_ledger_config(cfg)
        self._path = Path(path)
        self._seed = int(seed)
        self._subnet_names = list(subnets)
        unknown = sorted(set(self._cfg.subnet_shares) - set(self._subnet_names))
        if unknown:
            raise ConfigError(
                f"ledger.subnet_shares names unknown subnets {unknown}; subnets: {self._subnet_names}"
            )
        self._subnets = {name: SubnetState(name, [str(label) for label in subnets[name]]) for name in subnets}
        self._stake_V = torch.tensor([spec.stake for spec in self._cfg.validators], dtype=torch.float64)
        self._subnet_weights = fraction_weights(
            [self._cfg.subnet_shares.get(name, 1.0) for name in self._subnet_names]
        )
        self._pool_weights = fraction_weights(
            [self._cfg.owner_share, self._cfg.miner_share, self._cfg.validator_share]
        )
        self._closed = True
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = _acquire_writer_lock(self._path)
        try:
            self._conn = _connect(self._path, self._cfg.synchronous)
            self._load_or_create(resume_step)
        except BaseException:
            self.close()
            raise

    def _load_or_create(self, resume_step: int | None) -> None:
        if not has_tables(self._conn):
            self._create(genesis_step=resume_step or 0)
        else:
            self._check_meta()
            self._rollback_after(resume_step)
        self._load_state()
        self._step = self._last_block_step if resume_step is None else resume_step
        self._closed = False
        logger.info("ledger %s open at block %d (step %d)", self._path, self._height, self._step)

    def _meta(self) -> dict[str, str]:
        config = {
            key: value
            for key, value in dataclasses.asdict(self._cfg).items()
            if key not in RUNTIME_ONLY_FIELDS
        }
        return {
            "schema_version": str(SCHEMA_VERSION),
            "config": json.dumps(config, sort_keys=True),
            "subnets": json.dumps([[name, state.miner_labels] for name, state in self._subnets.items()]),
            "seed": str(self._seed),
        }

    def _create(self, genesis_step: int) -> None:
        if genesis_step:
            logger.warning("new ledger at step %d: rewards of earlier steps are not recorded", genesis_step)
        accounts = self._account_rows()
        meta_rows = sorted(self._meta().items())
        rows = {"meta": meta_rows, "accounts": [row[:-1] for row in accounts]}
        digest = block_hash(0, genesis_step, 0, 0, 0, GENESIS_PREV_HASH, rows)
        with _transaction(self._conn) as conn:
            create_tables(conn)
            conn.executemany(insert_sql("meta"), meta_rows)
            conn.executemany(insert_sql("accounts"), accounts)
            conn.execute(
                "INSERT INTO blocks VALUES (?, ?, ?, ?, ?, ?, ?)",
                (0, genesis_step, 0, 0, 0, GENESIS_PREV_HASH, digest),
            )

    def _account_rows(self) -> list[tuple[Any, ...]]:
        """Genesis accounts: owner, validators, then per subnet its miners and its three pending pools."""
        rows: list[tuple[Any, ...]] = [("owner", "owner", "", 0, "owner")]
        rows += [
            (f"validator/{i}", "validator", "", i, spec.behaviour)
            for i, spec in enumerate(self._cfg.validators)
        ]
        for name, state in self._subnets.items():
            rows += [
                (f"miner/{name}/{j}", "miner", name, j, label) for j, label in enumerate(state.miner_labels)
            ]
            rows += [(f"pending/{name}/{pool}", "pending", name, k, pool) for k, pool in enumerate(POOLS)]
        return [(account_id, *row, 0, 0) for account_id, row in enumerate(rows)]

    def _check_meta(self) -> None:
        stored = dict(self._conn.execute("SELECT key, value FROM meta"))
        for key, value in self._meta().items():
            if stored.get(key) != value:
                raise LedgerError(
                    f"ledger {self._path} was written with a different {key} (stored {stored.get(key)!r}, "
                    f"now {value!r}); resume with the original settings or start a new run directory"
                )

    def _rollback_after(self, resume_step: int | None) -> None:
        """Drop blocks closed after ``resume_step`` and recompute balances from the remaining payouts."""
        height, last_step = self._conn.execute(
            "SELECT height, step FROM blocks ORDER BY height DESC LIMIT 1"
        ).fetchone()
        if resume_step is None:
            if height > 0:
                raise LedgerError(
                    f"ledger {self._path} already has {height} blocks (up to step {last_step}); "
                    "open it with resume_step to continue a run"
                )
            return
        keep = self._conn.execute(
            "SELECT height, step FROM blocks WHERE step <= ? ORDER BY height DESC LIMIT 1", (resume_step,)
        ).fetchone()
        expected_step = resume_step - resume_step % self._cfg.steps_per_block
        if keep is None or keep[1] < expected_step:
            have = "no block" if keep is None else f"blocks only up to step {keep[1]}"
            raise LedgerError(
                f"ledger {self._path} has {have} but the run resumes after step {resume_step}: blocks are missing"
            )
        keep_height = keep[0]
        if keep_height == height:
            return
        with _transaction(self._conn) as conn:
            for table in BLOCK_TABLES:
                conn.execute(f"DELETE FROM {table} WHERE block > ?", (keep_height,))
            conn.execute("DELETE FROM blocks WHERE height > ?", (keep_height,))
            replayed = dict(conn.execute("SELECT account, SUM(amount) FROM payouts GROUP BY account"))
            conn.executemany(
                "UPDATE accounts SET balance = ? WHERE id = ?",
                [
                    (replayed.get(account, 0), account)
                    for (account,) in conn.execute("SELECT id FROM accounts")
                ],
            )
        logger.warning(
            "ledger %s rolled back blocks %d..%d to resume after step %d",
            self._path,
            keep_height + 1,
            height,
            resume_step,
        )

    def _load_state(self) -> None:
        conn = self._conn
        self._height, self._last_block_step, self._issuance, self._burned, self._last_hash = conn.execute(
            "SELECT height, step, issuance, burned, hash FROM blocks ORDER BY height DESC LIMIT 1"
        ).fetchone()
        self._account_ids = dict(conn.execute("SELECT name, id FROM accounts"))
        self._balances = dict(conn.execute("SELECT id, balance FROM accounts"))
        if sum(self._balances.values()) + self._burned != self._issuance:
            raise LedgerError(
                f"ledger {self._path}: invariant Σ balances + burned == issuance is broken; run verify"
            )
        for state in self._subnets.values():
            self._load_subnet_state(state)

    def _load_subnet_state(self, state: SubnetState) -> None:
        """Bonds, consensus and weight rows of the subnet's last epoch; failures of blocks since then."""
        conn = self._conn
        epochs_run, last_epoch_block = conn.execute(
            "SELECT COUNT(*), COALESCE(MAX(block), 0) FROM epochs WHERE subnet = ?", (state.name,)
        ).fetchone()
        state.epochs_run = epochs_run
        num_validators = len(self._cfg.validators)
        if epochs_run:
            where = (last_epoch_block, state.name)
            bonds_VM = torch.zeros(num_validators, state.num_miners, dtype=torch.float64)
            for validator, miner, value in conn.execute(
                "SELECT validator, miner, value FROM bonds WHERE block = ? AND subnet = ?", where
            ):
                bonds_VM[validator, miner] = value / FIXED_ONE
            state.prev_bonds_VM = bonds_VM
            consensus = [0] * state.num_miners
            for uid, value in conn.execute(
                "SELECT uid, value FROM epoch_values WHERE block = ? AND subnet = ? AND kind = 'consensus'",
                where,
            ):
                consensus[uid] = value
            state.last_consensus_fixed = consensus
            rows = {validator: [0] * state.num_miners for validator in range(num_validators)}
            for validator, miner, value in conn.execute(
                "SELECT validator, miner, value FROM weights WHERE block = ? AND subnet = ?", where
            ):
                rows[validator][miner] = value
            state.last_rows_u16 = rows
        for miner, failed, failed_steps in conn.execute(
            "SELECT miner, SUM(failed), SUM(failed_steps) FROM failures WHERE subnet = ? AND block > ? GROUP BY miner",
            (state.name, last_epoch_block),
        ):
            state.failed_M[miner] = failed
            state.failed_steps_M[miner] = failed_steps

    # -- the training loop's calls ----------------------------------------------------------------------

    @property
    def height(self) -> int:
        return self._height

    @property
    def path(self) -> Path:
        return self._path

    def after_step(
        self,
        step: int,
        score_view: ScoreView,
        failures: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Record training step ``step`` (consecutive, from 1); close a block and maybe run an epoch.

        ``score_view(v)`` gives validator v's PoI scores ``{layer: Tensor[E]}``; it is called only at an
        epoch, only for validators whose behaviour needs it. ``failures[layer][e]`` counts expert e's
        failures during this step.
        """
        if self._closed:
            raise LedgerError(f"ledger {self._path} is closed")
        if step != self._step + 1:
            raise LedgerError(
                f"ledger {self._path}: expected step {self._step + 1}, got {step} (steps must be consecutive)"
            )
        self._record_failures(failures or {})
        self._step = step
        if step % self._cfg.steps_per_block == 0:
            self._close_block(score_view)

    def _record_failures(self, failures: Mapping[str, torch.Tensor]) -> None:
        for layer, counts in failures.items():
            if layer not in self._subnets:
                raise LedgerError(f"failures for unknown subnet {layer!r}; subnets: {self._subnet_names}")
            state = self._subnets[layer]
            counts_M = torch.as_tensor(counts).detach().to("cpu").reshape(-1).to(torch.int64).tolist()
            if len(counts_M) != state.num_miners:
                raise LedgerError(
                    f"failures[{layer!r}] has {len(counts_M)} entries, subnet has {state.num_miners} miners"
                )
            state.record_failures(counts_M)

    def _close_block(self, score_view: ScoreView) -> None:
        draft = BlockDraft(
            height=self._height + 1,
            step=self._step,
            emission=block_emission(self._issuance),
            account_ids=self._account_ids,
            balances=self._balances,
        )
        self._accrue_emission(draft)
        for name in self._subnet_names:
            draft.rows["failures"] += self._subnets[name].open_failure_rows(draft.height)
        if draft.height % self._cfg.tempo == 0:
            views = CachedViews(score_view)
            for name in self._subnet_names:
                run_epoch(draft, self._subnets[name], self._cfg, self._stake_V, self._seed, views)
        self._commit(draft)
        self._apply(draft)

    def _accrue_emission(self, draft: BlockDraft) -> None:
        for name, subnet_amount in zip(
            self._subnet_names, apportion(draft.emission, self._subnet_weights), strict=True
        ):
            for pool, amount in zip(POOLS, apportion(subnet_amount, self._pool_weights), strict=True):
                draft.move(name, f"pending/{name}/{pool}", "emission", amount)
        if sum(draft.deltas.values()) != draft.emission:
            # Only when there is no subnet or every subnet share is 0: nobody may receive the emission.
            draft.burned += draft.emission - sum(draft.deltas.values())

    # -- writing --------------------------------------------------------------------------------------------

    def _commit(self, draft: BlockDraft) -> None:
        """Write the block and its rows in one transaction."""
        issuance = self._issuance + draft.emission
        burned = self._burned + draft.burned
        digest = block_hash(
            draft.height, draft.step, draft.emission, issuance, burned, self._last_hash, draft.rows
        )
        updates = [
            (self._balances[account] + delta, account) for account, delta in draft.deltas.items() if delta
        ]
        with _transaction(self._conn) as conn:
            for table, rows in draft.rows.items():
                conn.executemany(insert_sql(table), rows)
            conn.executemany("UPDATE accounts SET balance = ? WHERE id = ?", updates)
            conn.execute(
                "INSERT INTO blocks VALUES (?, ?, ?, ?, ?, ?, ?)",
                (draft.height, draft.step, draft.emission, issuance, burned, self._last_hash, digest),
            )
        self._last_hash = digest

    def _apply(self, draft: BlockDraft) -> None:
        """Move the committed block into memory (only after the transaction succeeded)."""
        self._height = draft.height
        self._last_block_step = draft.step
        self._issuance += draft.emission
        self._burned += draft.burned
        for account, delta in draft.deltas.items():
            self._balances[account] += delta
        for state in self._subnets.values():
            state.close_block()
        for name, update in draft.subnet_updates.items():
            self._subnets[name].apply_epoch(update, num_validators=len(self._cfg.validators))

    # -- reading and closing --------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Balances by role and by behaviour (units and tokens), issuance, burned, blocks, last epochs."""
        if self._conn is None:
            raise LedgerError(f"ledger {self._path} is closed")
        return summarise(self._conn)

    def close(self) -> None:
        """Checkpoint the WAL, close the database and release the writer lock (idempotent)."""
        self._closed = True
        if self._conn is not None:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as error:  # a reader may hold the WAL; the data is safe either way
                logger.debug("WAL checkpoint skipped: %s", error)
            self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> RewardLedger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, or ``ROLLBACK`` on any exception (the connection is autocommit)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _acquire_writer_lock(path: Path) -> int:
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


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
    return conn
