"""Reopening a ledger to resume a run: roll back the blocks after the checkpoint, rebuild each subnet's
state from the database, and take back the validators' unrevealed rows from the checkpoint.

Shape legend: V = validators, M = miners of one subnet.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from moe.errors import LedgerError
from moe.incentives.ledger.emission import FIXED_ONE
from moe.incentives.ledger.epoch import SubnetState
from moe.incentives.ledger.schema import BLOCK_TABLES, transaction
from moe.incentives.ledger.submissions import Validators

logger = logging.getLogger(__name__)


def rollback_after(
    conn: sqlite3.Connection, path: Path, resume_step: int | None, steps_per_block: int
) -> None:
    """Drop blocks closed after ``resume_step`` (and the accounts they registered) and recompute balances
    from the remaining payouts (the treasury's funding is a payout of block 0)."""
    height, last_step = conn.execute(
        "SELECT height, step FROM blocks ORDER BY height DESC LIMIT 1"
    ).fetchone()
    if resume_step is None:
        if height > 0:
            raise LedgerError(
                f"ledger {path} already has {height} blocks (up to step {last_step}); "
                "open it with resume_step to continue a run"
            )
        return
    keep = conn.execute(
        "SELECT height, step FROM blocks WHERE step <= ? ORDER BY height DESC LIMIT 1", (resume_step,)
    ).fetchone()
    expected_step = resume_step - resume_step % steps_per_block
    if keep is None or keep[1] < expected_step:
        have = "no block" if keep is None else f"blocks only up to step {keep[1]}"
        raise LedgerError(
            f"ledger {path} has {have} but the run resumes after step {resume_step}: blocks are missing"
        )
    keep_height = keep[0]
    if keep_height == height:
        return
    with transaction(conn):
        for table in BLOCK_TABLES:
            conn.execute(f"DELETE FROM {table} WHERE block > ?", (keep_height,))
        conn.execute("DELETE FROM blocks WHERE height > ?", (keep_height,))
        conn.execute("DELETE FROM accounts WHERE registered_block > ?", (keep_height,))  # providers
        replayed = dict(conn.execute("SELECT account, SUM(amount) FROM payouts GROUP BY account"))
        conn.executemany(
            "UPDATE accounts SET balance = ? WHERE id = ?",
            [(replayed.get(account, 0), account) for (account,) in conn.execute("SELECT id FROM accounts")],
        )
    logger.warning(
        "ledger %s rolled back blocks %d..%d to resume after step %d",
        path,
        keep_height + 1,
        height,
        resume_step,
    )


def load_subnet_state(
    conn: sqlite3.Connection, state: SubnetState, num_validators: int, commit_reveal: bool
) -> None:
    """Bonds, consensus and weight rows of the subnet's last epoch; failures of blocks since then."""
    epochs_run, last_epoch_block = conn.execute(
        "SELECT COUNT(*), COALESCE(MAX(block), 0) FROM epochs WHERE subnet = ?", (state.name,)
    ).fetchone()
    state.epochs_run = epochs_run
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
    if epochs_run and not commit_reveal:  # with commit-reveal: only the checkpoint knows them
        rows = {validator: [0] * state.num_miners for validator in range(num_validators)}
        for validator, miner, value in conn.execute(
            "SELECT validator, miner, value FROM weights WHERE block = ? AND subnet = ?",
            (last_epoch_block, state.name),
        ):
            rows[validator][miner] = value
        state.last_rows_u16 = rows
    for miner, failed, failed_steps in conn.execute(
        "SELECT miner, SUM(failed), SUM(failed_steps) FROM failures WHERE subnet = ? AND block > ? GROUP BY miner",
        (state.name, last_epoch_block),
    ):
        state.failed_M[miner] = failed
        state.failed_steps_M[miner] = failed_steps


def restore_unrevealed(
    conn: sqlite3.Connection,
    path: Path,
    subnets: Mapping[str, SubnetState],
    unrevealed: Mapping[str, Mapping[int, Sequence[int]]],
    validators: Validators,
) -> None:
    """Give each validator back the row it committed at the subnet's last epoch (from the checkpoint),
    after checking it opens the commit; a validator without one reveals nothing at the next epoch."""
    for name, state in subnets.items():
        (block,) = conn.execute(
            "SELECT COALESCE(MAX(block), 0) FROM epochs WHERE subnet = ?", (name,)
        ).fetchone()
        commits = dict(
            conn.execute(
                "SELECT validator, digest FROM submissions WHERE block = ? AND subnet = ? AND kind = 'commit'",
                (block, name),
            )
        )
        rows = {int(v): [int(x) for x in row] for v, row in unrevealed.get(name, {}).items()}
        for validator, row in rows.items():
            if validator not in commits or commits[validator] != validators.digest(
                validator, block, name, row
            ):
                raise LedgerError(
                    f"ledger {path}: the checkpoint's unrevealed weights of validator {validator} in "
                    f"subnet {name!r} do not match its commit at block {block}"
                )
        if set(commits) - set(rows):
            logger.warning(
                "subnet %s: validators %s cannot reveal (no unrevealed weights in the checkpoint)",
                name,
                sorted(set(commits) - set(rows)),
            )
        state.last_rows_u16 = rows
