"""Re-running the writer's accounting on what a ledger records, block by block, to check every block.

From the genesis block's config (shares, stakes, Yuma settings) and each block's recorded inputs
(the weight rows Yuma counted, and the previous epoch's bonds), ``Replay`` rebuilds the block with the
writer's own functions (``epoch.accrue_emission``, ``epoch.settle_epoch``): the emission and its
18/41/41 split (as configured), every epoch's Yuma outcome (consensus, incentive, dividends,
validator trust, bonds) and every payout. Any recorded row that differs from the rebuilt one names
its block. Failed audits (``audits``) are replayed too: their slashes, and the zero incentive of the
miners that failed or are banned. It also checks each epoch's signed submissions (``submissions.check_submissions``)
and re-runs every block's compute payments from the recorded charges (tokens, price) and the
treasury's replayed balance (``payments.replay_payments``), which starts at its genesis funding.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from moe.errors import ConfigError, LedgerError
from moe.incentives.ledger.audits import AuditPolicy, apply_audits
from moe.incentives.ledger.config import as_ledger_config, treasury_units
from moe.incentives.ledger.emission import block_emission, fraction_weights
from moe.incentives.ledger.epoch import BlockDraft, SubnetState, account_rows, accrue_emission, settle_epoch
from moe.incentives.ledger.payments import funding_rows, replay_payments
from moe.incentives.ledger.schema import SCHEMA_VERSION
from moe.incentives.ledger.submissions import Commit, check_submissions

# Tables a block's accounting writes (rebuilt by the replay); the others are its inputs.
REBUILT_TABLES = ("payouts", "epochs", "epoch_values", "bonds", "weights", "payments", "accounts")


class Replay:
    """The writer's state, rebuilt from the recorded blocks one at a time (``check``)."""

    def __init__(self, conn: sqlite3.Connection, genesis_hash: str) -> None:
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise LedgerError(
                f"block 0: schema version {meta.get('schema_version')!r}; this poimoe verifies {SCHEMA_VERSION}"
            )
        try:
            self.cfg = as_ledger_config(json.loads(meta["config"]))
            subnets = json.loads(meta["subnets"])
            self.audit_policy = AuditPolicy.from_meta(meta.get("audit"))
        except (KeyError, ValueError, ConfigError) as error:
            raise LedgerError(f"block 0: the recorded config cannot be read: {error}") from None
        self.genesis_hash = genesis_hash
        self.states = {name: SubnetState(name, list(labels)) for name, labels in subnets}
        self.subnet_weights = dict(
            zip(
                self.states,
                fraction_weights([self.cfg.subnet_shares.get(name, 1.0) for name in self.states]),
                strict=True,
            )
        )
        self.pool_weights = fraction_weights(
            [self.cfg.owner_share, self.cfg.miner_share, self.cfg.validator_share]
        )
        self.stake_V = torch.tensor([spec.stake for spec in self.cfg.validators], dtype=torch.float64)
        genesis_accounts = conn.execute(
            "SELECT id, name FROM accounts WHERE registered_block = 0 ORDER BY id"
        ).fetchall()
        self.account_ids = {name: account for account, name in genesis_accounts}
        self.names = {account: name for name, account in self.account_ids.items()}
        expected = {name for row in account_rows(self.cfg, self.states) for name in row[1:2]}
        if set(self.account_ids) != expected:
            raise LedgerError(
                f"block 0: the accounts do not match the recorded config "
                f"(unexpected {sorted(set(self.account_ids) - expected)}, missing {sorted(expected - set(self.account_ids))})"
            )
        self.balances = dict.fromkeys(self.account_ids.values(), 0)
        self.funded = treasury_units(self.cfg)
        self.funding = funding_rows(genesis_accounts, self.funded)
        for _, _, account, _, amount in self.funding:
            self.balances[account] += amount
        self.provider_hotkeys: dict[str, str] = {}
        self.compute_paid = 0
        hotkeys = dict(conn.execute("SELECT idx, hotkey FROM accounts WHERE role = 'validator'"))
        self.validator_hotkeys = [hotkeys.get(i, "") for i in range(len(self.cfg.validators))]
        self.commits: dict[str, dict[int, Commit]] = {name: {} for name in self.states}
        self.issuance = self.burned = 0
        self.epochs = 0

    def check(self, block: Sequence[Any], rows: Mapping[str, list[tuple[Any, ...]]]) -> None:
        """Rebuild block ``block = (height, step, emission, issuance, burned)`` and compare it."""
        height, step, emission, issuance, burned = block
        draft = BlockDraft(
            height=height,
            step=step,
            emission=block_emission(self.issuance),
            account_ids=self.account_ids,
            balances=self.balances,
        )
        if emission != draft.emission:
            raise LedgerError(f"block {height}: emission {emission} breaks the schedule ({draft.emission})")
        accrue_emission(draft, self.subnet_weights, self.pool_weights)
        names = self.names | {row[0]: row[1] for row in rows["accounts"]}
        replay_payments(draft, rows, self.provider_hotkeys, names)
        apply_audits(draft, self.states, rows["audits"], self.audit_policy, self.cfg.tempo)
        if height % self.cfg.tempo == 0:
            self.epochs += 1
            strangers = {row[1] for row in rows["submissions"]} - set(self.states)
            if strangers:
                raise LedgerError(f"block {height}: submissions for unknown subnets {sorted(strangers)}")
            for state in self.states.values():
                self._settle(draft, state, rows)
        elif rows["submissions"]:
            raise LedgerError(f"block {height}: weight submissions outside an epoch block")
        for table in REBUILT_TABLES:
            _compare(height, table, rows[table], draft.rows.get(table, []))
        expected = (self.issuance + draft.emission, self.burned + draft.burned)
        if (issuance, burned) != expected:
            raise LedgerError(
                f"block {height}: issuance, burned = {issuance}, {burned}; the replay gives {expected[0]}, {expected[1]}"
            )
        self._apply(draft)

    def _settle(self, draft: BlockDraft, state: SubnetState, rows: Mapping[str, list[tuple]]) -> None:
        """Check the subnet's submissions and settle its epoch on the rows the ledger says Yuma counted."""
        counted = [[0] * state.num_miners for _ in self.cfg.validators]
        for _, subnet, validator, miner, value in rows["weights"]:
            if subnet == state.name:
                if not (0 <= validator < len(counted) and 0 <= miner < state.num_miners):
                    raise LedgerError(
                        f"block {draft.height}: a weight for validator {validator}, miner {miner}"
                    )
                counted[validator][miner] = value
        self.commits[state.name] = check_submissions(
            draft.height,
            state.name,
            counted,
            [row for row in rows["submissions"] if row[1] == state.name],
            self.commits[state.name],
            self.validator_hotkeys,
            self.genesis_hash,
            self.cfg.commit_reveal,
        )
        settle_epoch(draft, state, self.cfg, self.stake_V, counted)

    def _apply(self, draft: BlockDraft) -> None:
        self.issuance += draft.emission
        self.burned += draft.burned
        self.account_ids.update(draft.new_accounts)
        self.names.update({account: name for name, account in draft.new_accounts.items()})
        self.balances.update(dict.fromkeys(draft.new_accounts.values(), 0))
        for payment in draft.rows.get("payments", ()):
            self.provider_hotkeys[payment[2]] = payment[3]
            self.compute_paid += payment[6]
        for account, delta in draft.deltas.items():
            self.balances[account] += delta
            if self.balances[account] < 0:
                raise LedgerError(f"block {draft.height}: account {account} would go negative")
        for name, update in draft.subnet_updates.items():
            self.states[name].apply_epoch(update, num_validators=len(self.cfg.validators))


def _compare(height: int, table: str, recorded: list[tuple], rebuilt: list[tuple]) -> None:
    """``LedgerError`` naming the first row where the recorded table differs from the rebuilt one."""
    recorded_set, rebuilt_set = set(recorded), set(rebuilt)
    if recorded_set == rebuilt_set and len(recorded) == len(rebuilt):
        return
    extra = sorted(recorded_set - rebuilt_set, key=repr)
    missing = sorted(rebuilt_set - recorded_set, key=repr)
    recorded_text = f"records {extra[0]}" if extra else "lacks a row"
    rebuilt_text = f"gives {missing[0]}" if missing else "has no such row"
    raise LedgerError(
        f"block {height}: {table} {recorded_text}, but the replay of the recorded weights, stake and "
        f"config {rebuilt_text}"
    )
