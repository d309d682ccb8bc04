"""The ledger writer: one run's ``RewardLedger`` opens (or resumes) the file and closes a block per step group.

Every ``steps_per_block`` training steps it closes a block: it mints ``block_emission(issuance)`` units,
splits them over subnets (one per MoE layer) and, within a subnet, over the owner, miner and validator
pools (exactly, by largest remainder), which accrue as pending balances. Every ``tempo`` blocks each
subnet runs an epoch (``epoch.run_epoch``) that pays the pending pools. Each block is written in one
transaction and signed by the writer's key (``signing``; kept outside the run dir). Each block also pays
the compute its steps were charged from the owner's treasury (``payments``). Invariant at every block:
``Σ balances + burned == issuance + funded`` (pending pools are accounts; ``funded``: the treasury's
genesis funding, ``ledger.treasury``).

Accounts: ``owner``, ``validator/<i>`` (shared by all subnets), ``miner/<subnet>/<j>``, the pending
pools ``pending/<subnet>/{owner,miners,validators}``, ``treasury`` and ``provider/<name>`` (registered
at a provider's first payment).

Shape legend: V = validators, M = miners of one subnet.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from moe.errors import ConfigError, LedgerError
from moe.incentives.ledger.anchor import anchor_from, head_of
from moe.incentives.ledger.audits import AuditPolicy, apply_audits, audit_rows, restore_audit_state
from moe.incentives.ledger.config import RUNTIME_ONLY_FIELDS, LedgerConfig, as_ledger_config, treasury_units
from moe.incentives.ledger.emission import block_emission, fraction_weights
from moe.incentives.ledger.epoch import (
    TREASURY,
    BlockDraft,
    CachedViews,
    ScoreView,
    SubnetState,
    account_rows,
    accrue_emission,
    run_epoch,
)
from moe.incentives.ledger.payments import OpenCharges, funding_rows, provider_hotkeys, settle_payments
from moe.incentives.ledger.reopen import load_subnet_state, restore_unrevealed, rollback_after
from moe.incentives.ledger.schema import (
    GENESIS_PREV_HASH,
    SCHEMA_VERSION,
    acquire_writer_lock,
    block_hash,
    connect_for_writing,
    create_tables,
    has_tables,
    insert_sql,
    transaction,
)
from moe.incentives.ledger.signing import block_message, load_writer, sign, validator_identity
from moe.incentives.ledger.submissions import Validators
from moe.incentives.ledger.summary import summarise

logger = logging.getLogger(__name__)


class RewardLedger:
    """Writes the reward ledger of one run; see the module docstring. ``RewardLedger(path, …)`` opens it.

    Failure rule: over an epoch, a miner whose failure count exceeds the number of steps it answered
    (steps with no failure) gets zero weight from honest (and first-time lazy) validators for that epoch.

    Resume: blocks closed after ``resume_step`` are dropped and the run's later ``after_step`` calls
    rebuild them. Steps of a block that was still open at ``resume_step`` are not replayed by the trainer,
    so their failure counts and compute charges are lost (nothing is paid for them); with checkpoints on
    block boundaries a resumed run is bit-identical (same block hashes) to an uninterrupted one. Call ``after_step`` before saving the checkpoint of a
    step, so that a checkpoint never runs ahead of the ledger.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        cfg: LedgerConfig | Mapping[str, Any],
        subnets: Mapping[str, Sequence[str]],
        seed: int,
        resume_step: int | None = None,
        checkpoint_state: Mapping[str, Any] | None = None,
        audit_policy: AuditPolicy | None = None,
    ) -> None:
        """Open (or create) the ledger at ``path`` for writing.

        ``subnets`` maps each MoE layer to one behaviour label per miner (expert). A new file gets a
        genesis block. An existing one needs ``resume_step`` (the step of the checkpoint the run resumes
        from): blocks closed after that step are rolled back, so the run continues with no gap and no
        duplicate. ``checkpoint_state`` is what ``checkpoint_state()`` returned at that step: its head
        must be in the chain, and with commit-reveal it carries the validators' unrevealed rows. The file
        is locked against a second writer until ``close``. ``audit_policy``: what a failed audit costs
        (``ledger/audits.py``; default: nothing beyond its record and the epoch's zero incentive).
        """
        self._cfg = as_ledger_config(cfg)
        self._audit_policy = audit_policy or AuditPolicy()
        self._open_audits: list[Any] = []
        self._funded = treasury_units(self._cfg)
        self._path = Path(path)
        self._seed = int(seed)
        self._subnet_names = list(subnets)
        unknown = sorted(set(self._cfg.subnet_shares) - set(self._subnet_names))
        if unknown:
            raise ConfigError(
                f"ledger.subnet_shares names unknown subnets {unknown}; subnets: {self._subnet_names}"
            )
        self._open_charges = OpenCharges(self._subnet_names)
        self._subnets = {name: SubnetState(name, [str(label) for label in subnets[name]]) for name in subnets}
        self._stake_V = torch.tensor([spec.stake for spec in self._cfg.validators], dtype=torch.float64)
        self._subnet_weights = dict(
            zip(
                self._subnet_names,
                fraction_weights([self._cfg.subnet_shares.get(name, 1.0) for name in self._subnet_names]),
                strict=True,
            )
        )
        self._pool_weights = fraction_weights(
            [self._cfg.owner_share, self._cfg.miner_share, self._cfg.validator_share]
        )
        self._writer = load_writer(self._cfg.keys_dir, self._path.parent)
        self._validator_keys = [
            validator_identity(self._writer, self._seed, i) for i in range(len(self._cfg.validators))
        ]
        self._closed = True
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = acquire_writer_lock(self._path)
        try:
            self._conn = connect_for_writing(self._path, self._cfg.synchronous)
            self._load_or_create(resume_step, checkpoint_state)
        except BaseException:
            self.close()
            raise

    def _load_or_create(self, resume_step: int | None, checkpoint_state: Mapping[str, Any] | None) -> None:
        if not has_tables(self._conn):
            self._create(genesis_step=resume_step or 0)
        else:
            self._check_meta()
            rollback_after(self._conn, self._path, resume_step, self._cfg.steps_per_block)
        self._load_state()
        if checkpoint_state is not None:
            self._restore(checkpoint_state)
        elif resume_step is not None and self._cfg.commit_reveal and self._height >= self._cfg.tempo:
            logger.warning(
                "ledger %s resumes without a checkpoint state: validators cannot reveal the weights they "
                "committed at the last epoch, so the next epoch counts none of them",
                self._path,
            )
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
            "audit": self._audit_policy.meta(),
        }

    def _create(self, genesis_step: int) -> None:
        if genesis_step:
            logger.warning("new ledger at step %d: rewards of earlier steps are not recorded", genesis_step)
        accounts = account_rows(
            self._cfg, self._subnets, self._writer.hotkey, [key.hotkey for key in self._validator_keys]
        )
        funding = funding_rows(accounts, self._funded)
        accounts = [(*row[:-1], self._funded) if row[1] == TREASURY else row for row in accounts]
        meta_rows = sorted(self._meta().items())
        rows = {"meta": meta_rows, "accounts": [row[:-1] for row in accounts], "payouts": funding}
        digest = block_hash(0, genesis_step, 0, 0, 0, GENESIS_PREV_HASH, rows)
        signature = sign(self._writer, block_message(0, digest))
        with transaction(self._conn) as conn:
            create_tables(conn)
            conn.executemany(insert_sql("meta"), meta_rows)
            conn.executemany(insert_sql("accounts"), accounts)
            conn.executemany(insert_sql("payouts"), funding)
            conn.execute(
                "INSERT INTO blocks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (0, genesis_step, 0, 0, 0, GENESIS_PREV_HASH, digest, signature),
            )

    def _check_meta(self) -> None:
        stored = dict(self._conn.execute("SELECT key, value FROM meta"))
        if stored.get("schema_version") != str(SCHEMA_VERSION):
            raise LedgerError(
                f"ledger {self._path} has schema version {stored.get('schema_version')!r}; this poimoe writes "
                f"{SCHEMA_VERSION}: start a new run directory"
            )
        (writer,) = self._conn.execute("SELECT hotkey FROM accounts WHERE name = 'owner'").fetchone()
        if writer != self._writer.hotkey:
            raise LedgerError(
                f"ledger {self._path} was signed by {writer}, but the writer key in ledger.keys_dir is "
                f"{self._writer.hotkey}: resume with the key that started the run"
            )
        for key, value in self._meta().items():
            if stored.get(key) != value:
                raise LedgerError(
                    f"ledger {self._path} was written with a different {key} (stored {stored.get(key)!r}, "
                    f"now {value!r}); resume with the original settings or start a new run directory"
                )

    def _load_state(self) -> None:
        conn = self._conn
        self._height, self._last_block_step, self._issuance, self._burned, self._last_hash = conn.execute(
            "SELECT height, step, issuance, burned, hash FROM blocks ORDER BY height DESC LIMIT 1"
        ).fetchone()
        self._account_ids = dict(conn.execute("SELECT name, id FROM accounts"))
        self._balances = dict(conn.execute("SELECT id, balance FROM accounts"))
        self._provider_hotkeys = provider_hotkeys(conn)
        if sum(self._balances.values()) + self._burned != self._issuance + self._funded:
            raise LedgerError(
                f"ledger {self._path}: invariant Σ balances + burned == issuance + funded is broken; run verify"
            )
        (genesis_hash,) = conn.execute("SELECT hash FROM blocks WHERE height = 0").fetchone()
        self._validators = Validators(
            self._validator_keys, genesis_hash, self._cfg.commit_reveal, self._cfg.tempo
        )
        for state in self._subnets.values():
            load_subnet_state(conn, state, len(self._cfg.validators), self._cfg.commit_reveal)
            restore_audit_state(conn, state, self._audit_policy, self._cfg.tempo)

    def _restore(self, checkpoint_state: Mapping[str, Any]) -> None:
        """Check the checkpoint's anchored head against the chain; take back the unrevealed rows."""
        head = anchor_from("the checkpoint", checkpoint_state.get("head"))
        found = self._conn.execute("SELECT hash FROM blocks WHERE height = ?", (head.height,)).fetchone()
        if head.writer != self._writer.hotkey or found is None or found[0] != head.hash:
            raise LedgerError(
                f"ledger {self._path}: block {head.height} is not the head anchored in the checkpoint: the "
                "ledger was rewritten, or the checkpoint belongs to another run"
            )
        if self._cfg.commit_reveal:
            restore_unrevealed(
                self._conn,
                self._path,
                self._subnets,
                checkpoint_state.get("unrevealed") or {},
                self._validators,
            )

    # -- the training loop's calls ----------------------------------------------------------------------

    @property
    def height(self) -> int:
        return self._height

    @property
    def path(self) -> Path:
        return self._path

    @property
    def writer_hotkey(self) -> str:
        """The public key that signs this ledger's blocks."""
        return self._writer.hotkey

    def head(self) -> dict[str, Any]:
        """The last block's height, hash and signature, and the writer's public key: what anchors keep."""
        if self._conn is None:
            raise LedgerError(f"ledger {self._path} is closed")
        return head_of(self._conn)

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the head (an anchor) and, with commit-reveal, each validator's row
        committed at the last epoch and not revealed yet (the validators' secret until the next epoch)."""
        unrevealed = {
            name: {validator: list(row) for validator, row in state.last_rows_u16.items()}
            for name, state in self._subnets.items()
            if self._cfg.commit_reveal
        }
        return {"head": self.head(), "unrevealed": unrevealed}

    def after_step(
        self,
        step: int,
        score_view: ScoreView,
        failures: Mapping[str, torch.Tensor] | None = None,
        audits: Sequence[Any] = (),
        charges: Sequence[Any] = (),
    ) -> None:
        """Record training step ``step`` (consecutive, from 1); close a block and maybe run an epoch.

        ``score_view(v)`` gives validator v's PoI scores ``{layer: Tensor[E]}``; it is called only at an
        epoch, only for validators whose behaviour needs it. ``failures[layer][e]`` counts expert e's
        failures during this step; ``audits`` are the audits that failed during it (objects with
        ``layer``, ``expert``, ``step``, ``check`` and ``evidence``; ``moe.incentives.audits.FailedAudit``);
        ``charges`` the compute this step is charged (objects with ``provider``, ``hotkey``, ``layer``,
        ``tokens`` and ``price_per_1k_units``; ``experts.market.ComputeCharge``), paid at the block's close.
        """
        if self._closed:
            raise LedgerError(f"ledger {self._path} is closed")
        if step != self._step + 1:
            raise LedgerError(
                f"ledger {self._path}: expected step {self._step + 1}, got {step} (steps must be consecutive)"
            )
        checked_charges = self._open_charges.check(charges, self._provider_hotkeys)
        self._record_failures(failures or {})
        self._open_audits += audit_rows(0, audits, self._subnet_names)
        self._open_charges.add(checked_charges)
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
        accrue_emission(draft, self._subnet_weights, self._pool_weights)
        settle_payments(draft, self._open_charges.rows(), self._provider_hotkeys)
        draft.rows["audits"] += [(draft.height, *row[1:]) for row in self._open_audits]
        apply_audits(draft, self._subnets, draft.rows["audits"], self._audit_policy, self._cfg.tempo)
        for name in self._subnet_names:
            draft.rows["failures"] += self._subnets[name].open_failure_rows(draft.height)
        if draft.height % self._cfg.tempo == 0:
            views = CachedViews(score_view)
            for name in self._subnet_names:
                run_epoch(
                    draft, self._subnets[name], self._cfg, self._stake_V, self._seed, views, self._validators
                )
        self._commit(draft)
        self._apply(draft)

    # -- writing --------------------------------------------------------------------------------------------

    def _commit(self, draft: BlockDraft) -> None:
        """Write the block and its rows in one transaction."""
        issuance = self._issuance + draft.emission
        burned = self._burned + draft.burned
        digest = block_hash(
            draft.height, draft.step, draft.emission, issuance, burned, self._last_hash, draft.rows
        )
        signature = sign(self._writer, block_message(draft.height, digest))
        updates = [
            (self._balances.get(account, 0) + delta, account)
            for account, delta in draft.deltas.items()
            if delta
        ]
        with transaction(self._conn) as conn:
            conn.executemany(insert_sql("accounts"), [(*row, 0) for row in draft.rows.get("accounts", ())])
            for table, rows in draft.rows.items():
                if table != "accounts":
                    conn.executemany(insert_sql(table), rows)
            conn.executemany("UPDATE accounts SET balance = ? WHERE id = ?", updates)
            conn.execute(
                "INSERT INTO blocks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    draft.height,
                    draft.step,
                    draft.emission,
                    issuance,
                    burned,
                    self._last_hash,
                    digest,
                    signature,
                ),
            )
        self._last_hash = digest

    def _apply(self, draft: BlockDraft) -> None:
        """Move the committed block into memory (only after the transaction succeeded)."""
        self._height = draft.height
        self._last_block_step = draft.step
        self._issuance += draft.emission
        self._burned += draft.burned
        self._account_ids.update(draft.new_accounts)
        self._balances.update(dict.fromkeys(draft.new_accounts.values(), 0))
        for account, delta in draft.deltas.items():
            self._balances[account] += delta
        self._provider_hotkeys.update({row[2]: row[3] for row in draft.rows.get("payments", ())})
        self._open_audits = []
        self._open_charges.clear()
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
