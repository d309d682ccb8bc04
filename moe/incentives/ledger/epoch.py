"""One block's draft and one subnet's epoch: collect the weight rows, run Yuma, pay the pending pools.

A block is built as a ``BlockDraft`` (rows and balance deltas) before its transaction and applied to
memory only after the commit, so a failed write leaves the ledger's state untouched. Every block
accrues its emission to the pending pools (``accrue_emission``). At an epoch each validator chooses a
row (see ``validators``) and submits it signed (``submissions``; with commit-reveal the rows counted
are those revealed now, chosen an epoch earlier); ``settle_epoch`` runs ``yuma_epoch`` on the counted
rows and pays the subnet's pending pools: miner j gets ``floor(pool·I_j)``, validator i
``floor(pool·D_i)`` (by stake when no validator earned dividends), the owner everything. The rounding
remainder stays pending; a pool nobody may receive is burned. ``accrue_emission`` and
``settle_epoch`` are pure functions of the recorded inputs, so ``verify`` re-runs them to check a block.

Shape legend: V = validators, M = miners of one subnet.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moe.errors import LedgerError
from moe.incentives.consensus import YumaResult, yuma_epoch
from moe.incentives.ledger.audits import AuditState
from moe.incentives.ledger.config import LedgerConfig
from moe.incentives.ledger.emission import FIXED_ONE, apportion, pro_rata_floor, to_fixed, to_u16_row
from moe.incentives.ledger.submissions import Validators
from moe.incentives.ledger.validators import WEIGHT_SETTERS, EpochInputs

logger = logging.getLogger(__name__)

POOLS = ("owner", "miners", "validators")
TREASURY = "treasury"  # the owner's account that compute payments come from (ledger/payments.py)

# Validator v's PoI scores per subnet (MoE layer): ``score_view(v) -> {layer: Tensor[M]}``.
ScoreView = Callable[[int], Mapping[str, torch.Tensor]]


@dataclass
class SubnetState:
    """What a subnet's next epoch needs from the past; rebuilt from the database when a ledger reopens.

    Failures are counted per miner since the subnet's last epoch: ``failed_M`` over closed blocks,
    ``open_failed_M`` over the steps of the block still open (``*_steps_M``: steps with any failure).
    """

    name: str
    miner_labels: list[str]
    epochs_run: int = 0
    prev_bonds_VM: torch.Tensor | None = None
    last_consensus_fixed: list[int] | None = None
    last_rows_u16: dict[int, list[int]] = field(default_factory=dict)
    failed_M: list[int] = field(default_factory=list)
    failed_steps_M: list[int] = field(default_factory=list)
    open_failed_M: list[int] = field(default_factory=list)
    open_failed_steps_M: list[int] = field(default_factory=list)
    audits: AuditState | None = None  # failed audits, bans (ledger/audits.py)

    def __post_init__(self) -> None:
        for counts in (self.failed_M, self.failed_steps_M, self.open_failed_M, self.open_failed_steps_M):
            counts[:] = counts or [0] * self.num_miners
        self.audits = self.audits or AuditState(self.num_miners)

    @property
    def num_miners(self) -> int:
        return len(self.miner_labels)

    def record_failures(self, counts_M: Sequence[int]) -> None:
        """Add one step's failure counts to the open block."""
        for miner, count in enumerate(counts_M):
            if count > 0:
                self.open_failed_M[miner] += count
                self.open_failed_steps_M[miner] += 1

    def open_failure_rows(self, height: int) -> list[tuple[Any, ...]]:
        """The ``failures`` rows of the block being closed."""
        return [
            (height, self.name, miner, failed, steps)
            for miner, (failed, steps) in enumerate(
                zip(self.open_failed_M, self.open_failed_steps_M, strict=True)
            )
            if failed
        ]

    def failing_miners(self, epoch_steps: int) -> torch.Tensor:
        """Miners that failed more often than they answered during this epoch's steps."""
        return torch.tensor(
            [
                failed + open_failed > epoch_steps - (steps + open_steps)
                for failed, steps, open_failed, open_steps in zip(
                    self.failed_M,
                    self.failed_steps_M,
                    self.open_failed_M,
                    self.open_failed_steps_M,
                    strict=True,
                )
            ],
            dtype=torch.bool,
        )

    def close_block(self) -> None:
        """The open block was committed: its failures now count as closed."""
        for miner in range(self.num_miners):
            self.failed_M[miner] += self.open_failed_M[miner]
            self.failed_steps_M[miner] += self.open_failed_steps_M[miner]
        self.open_failed_M[:] = [0] * self.num_miners
        self.open_failed_steps_M[:] = [0] * self.num_miners

    def apply_epoch(self, update: Mapping[str, Any], num_validators: int) -> None:
        """The epoch was committed: keep what the next one needs and restart the failure counts."""
        self.epochs_run += 1
        self.last_consensus_fixed = update["consensus"]
        self.last_rows_u16 = dict(enumerate(update["rows"]))
        # The same integer-to-float path as on reopening, so a resumed run computes identical bonds.
        bonds = torch.tensor(update["bonds"], dtype=torch.int64).reshape(num_validators, self.num_miners)
        self.prev_bonds_VM = bonds.to(torch.float64) / FIXED_ONE
        self.failed_M[:] = [0] * self.num_miners
        self.failed_steps_M[:] = [0] * self.num_miners
        self.audits.epoch_settled()


@dataclass
class BlockDraft:
    """Everything one block writes, built before the transaction and applied to memory after it.

    ``balances`` are the committed balances by account id; ``deltas`` what this block moves;
    ``new_accounts`` the accounts this block registers (name → id; their rows are in ``rows["accounts"]``).
    """

    height: int
    step: int
    emission: int
    account_ids: Mapping[str, int]
    balances: Mapping[int, int]
    rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=lambda: defaultdict(list))
    deltas: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    burned: int = 0
    subnet_updates: dict[str, dict[str, Any]] = field(default_factory=dict)
    new_accounts: dict[str, int] = field(default_factory=dict)

    def account_id(self, account_name: str) -> int:
        if account_name in self.new_accounts:
            return self.new_accounts[account_name]
        return self.account_ids[account_name]

    def register(self, name: str, role: str, subnet: str, idx: int, behaviour: str, hotkey: str) -> int:
        """Register an account in this block (an ``accounts`` row, balance 0); return its id."""
        account = max([*self.account_ids.values(), *self.new_accounts.values()], default=-1) + 1
        self.new_accounts[name] = account
        self.rows["accounts"].append((account, name, role, subnet, idx, behaviour, hotkey, self.height))
        return account

    def move(self, subnet: str, account_name: str, reason: str, amount: int) -> None:
        """Record a signed movement of ``amount`` units on an account (a ``payouts`` row)."""
        if amount:
            account = self.account_id(account_name)
            self.rows["payouts"].append((self.height, subnet, account, reason, amount))
            self.deltas[account] += amount

    def balance(self, account_name: str) -> int:
        """The account's balance including what this block has moved so far."""
        account = self.account_id(account_name)
        return self.balances.get(account, 0) + self.deltas[account]

    def pay(
        self, subnet: str, pool: str, recipients: Sequence[str], shares: Sequence[int], reason: str
    ) -> tuple[int, int, int]:
        """Pay a pending pool pro rata to ``shares``; burn it if nobody has a share.

        Returns (pool, paid, burned); the rest stays pending (carried to the next epoch).
        """
        source = f"pending/{subnet}/{pool}"
        amount = self.balance(source)
        if amount == 0:
            return 0, 0, 0
        if sum(shares) == 0:
            self.move(subnet, source, "burn", -amount)
            self.burned += amount
            return amount, 0, amount
        payouts = pro_rata_floor(amount, shares)
        for recipient, payout in zip(recipients, payouts, strict=True):
            self.move(subnet, recipient, reason, payout)
        self.move(subnet, source, "distribute", -sum(payouts))
        return amount, sum(payouts), 0


def account_rows(
    cfg: LedgerConfig,
    subnets: Mapping[str, SubnetState],
    writer: str = "",
    validator_hotkeys: Sequence[str] = (),
) -> list[tuple[Any, ...]]:
    """Genesis accounts: owner (the writer's key), validators (theirs), then per subnet its miners and
    its three pending pools, and the owner's treasury (the writer's key; it pays for compute); as
    ``accounts`` rows with balance 0, registered at block 0."""
    hotkeys = list(validator_hotkeys) or [""] * len(cfg.validators)
    rows: list[tuple[Any, ...]] = [("owner", "owner", "", 0, "owner", writer)]
    rows += [
        (f"validator/{i}", "validator", "", i, spec.behaviour, hotkeys[i])
        for i, spec in enumerate(cfg.validators)
    ]
    for name, state in subnets.items():
        rows += [
            (f"miner/{name}/{j}", "miner", name, j, label, "") for j, label in enumerate(state.miner_labels)
        ]
        rows += [(f"pending/{name}/{pool}", "pending", name, k, pool, "") for k, pool in enumerate(POOLS)]
    rows.append((TREASURY, "treasury", "", 0, "treasury", writer))  # last, so other accounts keep their ids
    return [(account_id, *row, 0, 0) for account_id, row in enumerate(rows)]


class CachedViews:
    """Calls ``score_view(v)`` at most once per validator per epoch block and checks its shape."""

    def __init__(self, score_view: ScoreView) -> None:
        self._score_view = score_view
        self._cache: dict[int, Mapping[str, torch.Tensor]] = {}

    def layer(self, validator: int, subnet: str, num_miners: int) -> torch.Tensor:
        if validator not in self._cache:
            self._cache[validator] = self._score_view(validator)
        view = self._cache[validator]
        if subnet not in view:
            raise LedgerError(
                f"score_view({validator}) has no scores for subnet {subnet!r}; it has {sorted(view)}"
            )
        scores_M = torch.as_tensor(view[subnet]).reshape(-1)
        if scores_M.numel() != num_miners:
            raise LedgerError(
                f"score_view({validator})[{subnet!r}] has {scores_M.numel()} scores, subnet has {num_miners} miners"
            )
        return scores_M


def accrue_emission(
    draft: BlockDraft, subnet_weights: Mapping[str, int], pool_weights: Sequence[int]
) -> None:
    """Split the block's emission over the subnets, and each subnet's part over its three pending pools
    (exactly, by largest remainder); what no subnet may receive is burned."""
    for name, subnet_amount in zip(
        subnet_weights, apportion(draft.emission, list(subnet_weights.values())), strict=True
    ):
        for pool, amount in zip(POOLS, apportion(subnet_amount, pool_weights), strict=True):
            draft.move(name, f"pending/{name}/{pool}", "emission", amount)
    if sum(draft.deltas.values()) != draft.emission:
        # Only when there is no subnet or every subnet share is 0: nobody may receive the emission.
        draft.burned += draft.emission - sum(draft.deltas.values())


def run_epoch(
    draft: BlockDraft,
    state: SubnetState,
    cfg: LedgerConfig,
    stake_V: torch.Tensor,
    seed: int,
    views: CachedViews,
    validators: Validators,
) -> None:
    """Collect and sign the validators' rows, then settle the epoch on the rows it counts."""
    chosen_rows = _weight_rows(state, cfg, seed, draft.height // cfg.tempo, views)
    counted_rows = validators.submit(draft, state.name, chosen_rows, state.last_rows_u16)
    settle_epoch(draft, state, cfg, stake_V, counted_rows)
    draft.subnet_updates[state.name]["rows"] = chosen_rows


def settle_epoch(
    draft: BlockDraft,
    state: SubnetState,
    cfg: LedgerConfig,
    stake_V: torch.Tensor,
    rows_u16: Sequence[Sequence[int]],
) -> None:
    """Run Yuma on ``rows_u16`` (one u16 row per validator), pay the subnet's pending pools and record
    the ``weights``, ``bonds``, ``epochs`` and ``epoch_values`` rows in ``draft``."""
    epoch = draft.height // cfg.tempo
    weights_VM = torch.tensor(rows_u16, dtype=torch.float64).reshape(len(rows_u16), state.num_miners)
    result = yuma_epoch(
        weights_VM,
        stake_V,
        state.prev_bonds_VM,
        kappa=cfg.kappa,
        bond_alpha=cfg.bond_alpha,
        bonds_penalty=cfg.bonds_penalty,
        yuma3=cfg.yuma3,
        liquid_alpha=cfg.liquid_alpha,
    )
    bonds_VM = to_fixed(result.bonds.reshape(-1))
    consensus = _pay_epoch(draft, state, epoch, result)
    height, name = draft.height, state.name
    draft.rows["weights"] += [
        (height, name, i, j, value) for i, row in enumerate(rows_u16) for j, value in enumerate(row) if value
    ]
    num_miners = max(state.num_miners, 1)
    draft.rows["bonds"] += [
        (height, name, flat // num_miners, flat % num_miners, value)
        for flat, value in enumerate(bonds_VM)
        if value
    ]
    draft.subnet_updates[name] = {
        "consensus": consensus,
        "bonds": bonds_VM,
        "rows": [list(r) for r in rows_u16],
    }


def _weight_rows(
    state: SubnetState, cfg: LedgerConfig, seed: int, epoch: int, views: CachedViews
) -> list[list[int]]:
    """Every validator's u16 row over the subnet's miners, by its behaviour."""
    failing_M = state.failing_miners(cfg.tempo * cfg.steps_per_block)
    rows_u16 = []
    for validator, spec in enumerate(cfg.validators):
        inputs = EpochInputs(
            validator=validator,
            spec=spec,
            subnet=state.name,
            num_miners=state.num_miners,
            epoch=epoch,
            epochs_run=state.epochs_run,
            seed=seed,
            last_consensus_fixed=state.last_consensus_fixed,
            last_row_u16=state.last_rows_u16.get(validator),
            view_M=lambda validator=validator: views.layer(validator, state.name, state.num_miners),
            failing_M=failing_M,
        )
        rows_u16.append(to_u16_row(WEIGHT_SETTERS[spec.behaviour](inputs)))
    return rows_u16


def _pay_epoch(draft: BlockDraft, state: SubnetState, epoch: int, result: YumaResult) -> list[int]:
    """Pay the three pending pools and record the ``epochs`` and ``epoch_values`` rows; return consensus."""
    height, name = draft.height, state.name
    consensus = to_fixed(result.consensus)
    # a miner that failed an audit since the last epoch, or is banned, earns nothing this epoch
    incentive = [
        0 if barred else i
        for i, barred in zip(to_fixed(result.incentive), state.audits.barred(epoch), strict=True)
    ]
    dividends = to_fixed(result.dividends)
    miners = [f"miner/{name}/{j}" for j in range(state.num_miners)]
    validators = [f"validator/{i}" for i in range(len(dividends))]
    miner_pool, miner_paid, miner_burned = draft.pay(name, "miners", miners, incentive, "incentive")
    dividends_by_stake = sum(dividends) == 0
    validator_shares = to_fixed(result.stake) if dividends_by_stake else dividends
    validator_pool, validator_paid, validator_burned = draft.pay(
        name, "validators", validators, validator_shares, "dividend"
    )
    owner_pool, _, _ = draft.pay(name, "owner", ["owner"], [1], "owner")
    carried = (miner_pool - miner_paid - miner_burned) + (validator_pool - validator_paid - validator_burned)
    burned = miner_burned + validator_burned

    pools = (miner_pool, miner_paid, validator_pool, validator_paid, owner_pool, carried, burned)
    draft.rows["epochs"].append((height, name, epoch, *pools, int(dividends_by_stake)))
    values = draft.rows["epoch_values"]
    values += [(height, name, "consensus", j, v) for j, v in enumerate(consensus)]
    values += [(height, name, "incentive", j, v) for j, v in enumerate(incentive)]
    values += [(height, name, "dividends", i, v) for i, v in enumerate(dividends)]
    values += [
        (height, name, "validator_trust", i, v) for i, v in enumerate(to_fixed(result.validator_trust))
    ]
    logger.debug("epoch %d of subnet %s: incentive %s, dividends %s", epoch, name, incentive, dividends)
    return consensus
