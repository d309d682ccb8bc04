"""The reward ledger: TAO-style emission, validators with stake, Yuma epochs, and a hash-chained SQLite record.

Every ``steps_per_block`` training steps the ledger closes a block: it mints ``block_emission(issuance)``
base units (1 token = 10**9 units), splits them over subnets (one per MoE layer) and, within a subnet,
over the owner, miner and validator pools (exactly, by largest remainder), which accrue as pending
balances. Every ``tempo`` blocks each subnet runs an epoch: every validator submits a weight row over
the subnet's miners (its experts), ``moe.incentives.consensus.yuma_epoch`` turns the rows into incentive and
dividends, and the pending pools are paid: miner j gets ``floor(pool·I_j)``, validator i
``floor(pool·D_i)`` (by stake when no validator earned dividends), the owner everything. Amounts are
Python integers throughout; the rounding remainder stays pending (carried to the next epoch) and a pool
nobody may receive (no miner has incentive, or no validator has stake) is burned; both are recorded in
the ``epochs`` row.

Accounts: ``owner``, ``validator/<i>`` (shared by all subnets), ``miner/<subnet>/<j>`` and the pending
pools ``pending/<subnet>/{owner,miners,validators}``. Tables: ``meta`` (config, subnets, seed),
``accounts``, ``blocks``, ``payouts`` (every movement of units, signed), ``epochs`` (pools, paid,
carried, burned), ``epoch_values`` (consensus, incentive, dividends, validator trust in units of 1e-9),
``weights`` (u16 rows as on chain), ``bonds`` (1e-9) and ``failures`` (per block and miner).

Storage is one SQLite file (WAL) written in one transaction per block. Each block's SHA-256 covers the
block's fields, the previous block's hash and every row written in that block in every table, so
``python -m moe.ledger verify PATH`` detects a change to any row; account balances are checked by
replaying the ``payouts`` table, which holds every movement of units. Invariant at every block:
``Σ balances + burned == issuance`` (pending pools are accounts too).

Shape legend: V = validators, M = miners of one subnet.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import sqlite3
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe.errors import ConfigError, LedgerError
from moe.incentives.consensus import yuma_epoch

logger = logging.getLogger(__name__)

TOKEN = 10**9
SUPPLY_CAP = 21_000_000 * TOKEN
# Fractions (consensus, incentive, dividends, trust, bonds) are stored as integers in units of 1e-9.
FIXED_ONE = 10**9
# Weight rows are stored as on chain: u16, scaled so the row's largest weight is 65535.
WEIGHT_MAX = 65_535
SCHEMA_VERSION = 1
GENESIS_PREV_HASH = "0" * 64
BEHAVIOURS = ("honest", "weight_copier", "cabal", "random", "lazy")
POOLS = ("owner", "miners", "validators")
SYNCHRONOUS_MODES = ("normal", "full")


# ---------------------------------------------------------------------------------------------------------
# Emission schedule


def block_emission(issuance: int) -> int:
    """Units minted by the next block, given the units issued so far.

    1 token per block while issuance < 10.5M tokens, halving each time issuance crosses
    ``21M·(1 − 2^−k)`` (era k pays ``10**9 >> k`` units), and 0 from the 21M cap on. Exact integers: the
    era is the largest k with ``(cap − issuance)·2^k ≤ cap``, i.e. ``floor(log2(cap // remaining))``.
    Era 30 and later pay 0 units, so issuance stops about 0.02 tokens short of the cap.
    """
    if issuance < 0:
        raise ValueError(f"issuance must be non-negative, got {issuance}")
    remaining = SUPPLY_CAP - issuance
    if remaining <= 0:
        return 0
    era = (SUPPLY_CAP // remaining).bit_length() - 1
    return min(TOKEN >> era, remaining)


# ---------------------------------------------------------------------------------------------------------
# Config


@dataclass
class ValidatorSpec:
    """One validator: its stake (any non-negative scale) and how it sets weights.

    Behaviours: ``honest`` (its normalised PoI view), ``weight_copier`` (last epoch's consensus),
    ``cabal`` (all weight on ``cabal_miners``, the same miner indices in every subnet), ``random``
    (seeded uniform weights) and ``lazy`` (sets weights once, honestly, and never updates them).
    """

    stake: float = 1.0
    behaviour: str = "honest"
    cabal_miners: list[int] = field(default_factory=list)


def _default_validators() -> list[ValidatorSpec]:
    return [
        ValidatorSpec(stake=600.0, behaviour="honest"),
        ValidatorSpec(stake=250.0, behaviour="honest"),
        ValidatorSpec(stake=150.0, behaviour="weight_copier"),
    ]


@dataclass
class LedgerConfig:
    """Typed config of the reward ledger (Hydra group ``ledger``).

    Shares are relative weights (normalised here). ``subnet_shares`` weighs each subnet's part of the
    emission; subnets not listed weigh 1. ``liquid_alpha`` is ``[alpha_low, alpha_high]`` or
    ``[alpha_low, alpha_high, steepness]`` and needs ``yuma3``. ``synchronous``: ``normal`` (WAL; survives
    a killed process, the last blocks may be lost on power loss) or ``full`` (fsync every block).
    """

    enabled: bool = True
    steps_per_block: int = 1
    tempo: int = 10
    owner_share: float = 0.18
    miner_share: float = 0.41
    validator_share: float = 0.41
    kappa: float = 0.5
    bond_alpha: float = 0.1
    bonds_penalty: float = 1.0
    yuma3: bool = False
    liquid_alpha: list[float] | None = None
    validators: list[ValidatorSpec] = field(default_factory=_default_validators)
    subnet_shares: dict[str, float] = field(default_factory=dict)
    synchronous: str = "normal"


# Config fields that do not change what the ledger records, so a resumed run may change them.
_RUNTIME_ONLY_FIELDS = ("enabled", "synchronous")


def as_ledger_config(cfg: LedgerConfig | Mapping[str, Any]) -> LedgerConfig:
    """Accept a ``LedgerConfig``, an OmegaConf node or a plain mapping; return a validated ``LedgerConfig``.

    Numbers are coerced to the field types, so ``stake: 600`` and ``stake: 600.0`` name the same ledger.
    """
    values = dataclasses.asdict(cfg) if isinstance(cfg, LedgerConfig) else _plain_container(cfg)
    try:
        if "validators" in values:
            values["validators"] = [_validator_spec(dict(spec)) for spec in values["validators"]]
        cfg = LedgerConfig(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"ledger config: {error}") from error
    for key in ("owner_share", "miner_share", "validator_share", "kappa", "bond_alpha", "bonds_penalty"):
        setattr(cfg, key, float(getattr(cfg, key)))
    cfg.subnet_shares = {str(name): float(weight) for name, weight in cfg.subnet_shares.items()}
    if cfg.liquid_alpha is not None:
        cfg.liquid_alpha = [float(value) for value in cfg.liquid_alpha]
    validate_config(cfg)
    return cfg


def _validator_spec(values: dict[str, Any]) -> ValidatorSpec:
    spec = ValidatorSpec(**values)
    return ValidatorSpec(
        stake=float(spec.stake),
        behaviour=str(spec.behaviour),
        cabal_miners=[int(m) for m in spec.cabal_miners],
    )


def _plain_container(cfg: Mapping[str, Any]) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf comes with hydra-core
        return dict(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def validate_config(cfg: LedgerConfig) -> None:
    """Raise ``ConfigError`` naming the first invalid key."""
    if cfg.steps_per_block < 1:
        raise ConfigError(f"ledger.steps_per_block must be >= 1, got {cfg.steps_per_block}")
    if cfg.tempo < 1:
        raise ConfigError(f"ledger.tempo must be >= 1, got {cfg.tempo}")
    shares = {
        "owner_share": cfg.owner_share,
        "miner_share": cfg.miner_share,
        "validator_share": cfg.validator_share,
    }
    for key, value in shares.items():
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"ledger.{key} must be a non-negative number, got {value}")
    if sum(shares.values()) <= 0:
        raise ConfigError("ledger.owner_share + miner_share + validator_share must be > 0")
    for key in ("kappa", "bond_alpha", "bonds_penalty"):
        value = getattr(cfg, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"ledger.{key} must lie in [0, 1], got {value}")
    if cfg.liquid_alpha is not None:
        if not cfg.yuma3:
            raise ConfigError("ledger.liquid_alpha needs ledger.yuma3=true")
        values = list(cfg.liquid_alpha)
        if len(values) not in (2, 3) or not 0.0 <= values[0] <= values[1] <= 1.0:
            raise ConfigError(
                f"ledger.liquid_alpha must be [low, high] or [low, high, steepness], got {values}"
            )
    if not cfg.validators:
        raise ConfigError("ledger.validators must list at least one validator")
    for index, spec in enumerate(cfg.validators):
        _validate_validator(index, spec)
    for name, weight in cfg.subnet_shares.items():
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"ledger.subnet_shares.{name} must be a non-negative number, got {weight}")
    if cfg.synchronous not in SYNCHRONOUS_MODES:
        raise ConfigError(
            f"ledger.synchronous must be one of {list(SYNCHRONOUS_MODES)}, got {cfg.synchronous!r}"
        )


def _validate_validator(index: int, spec: ValidatorSpec) -> None:
    if spec.behaviour not in BEHAVIOURS:
        raise ConfigError(
            f"ledger.validators[{index}].behaviour: unknown {spec.behaviour!r}; valid: {', '.join(BEHAVIOURS)}"
        )
    if not (math.isfinite(spec.stake) and spec.stake >= 0):
        raise ConfigError(f"ledger.validators[{index}].stake must be a non-negative number, got {spec.stake}")
    if spec.behaviour == "cabal" and not spec.cabal_miners:
        raise ConfigError(f"ledger.validators[{index}]: a cabal validator needs cabal_miners (miner indices)")
    if any(miner < 0 for miner in spec.cabal_miners):
        raise ConfigError(
            f"ledger.validators[{index}].cabal_miners must be non-negative, got {spec.cabal_miners}"
        )


# ---------------------------------------------------------------------------------------------------------
# Integer arithmetic


def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` units in proportion to integer ``weights`` exactly (largest remainder, ties by index)."""
    weight_sum = sum(weights)
    if total == 0 or weight_sum == 0:
        return [0] * len(weights)
    parts = [total * weight // weight_sum for weight in weights]
    leftover = total - sum(parts)
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % weight_sum), i))
    for index in by_remainder[:leftover]:
        parts[index] += 1
    return parts


def pro_rata_floor(pool: int, shares: Sequence[int]) -> list[int]:
    """``floor(pool · share / Σ shares)`` each; the caller carries ``pool − Σ result``."""
    share_sum = sum(shares)
    if share_sum == 0:
        return [0] * len(shares)
    return [pool * share // share_sum for share in shares]


def _to_fixed(values: torch.Tensor) -> list[int]:
    return torch.round(values.to(torch.float64) * FIXED_ONE).to(torch.int64).tolist()


def _fraction_weights(values: Sequence[float]) -> list[int]:
    return [round(value * FIXED_ONE) for value in values]


def _to_u16_row(row_M: torch.Tensor) -> list[int]:
    """Scale a non-negative row so its maximum is ``WEIGHT_MAX`` and round (how the chain stores weights)."""
    row_M = torch.nan_to_num(row_M.detach().to("cpu", torch.float64), nan=0.0, posinf=0.0).clamp_min(0.0)
    peak = float(row_M.max()) if row_M.numel() else 0.0
    if peak <= 0.0:
        return [0] * row_M.numel()
    return torch.round(row_M / peak * WEIGHT_MAX).to(torch.int64).tolist()


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, the same in every process (unlike ``hash``)."""
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# ---------------------------------------------------------------------------------------------------------
# Storage schema and block hashing

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID, STRICT;
CREATE TABLE accounts (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, role TEXT NOT NULL, subnet TEXT NOT NULL,
    idx INTEGER NOT NULL, behaviour TEXT NOT NULL, registered_block INTEGER NOT NULL, balance INTEGER NOT NULL
) STRICT;
CREATE TABLE blocks (
    height INTEGER PRIMARY KEY, step INTEGER NOT NULL, emission INTEGER NOT NULL, issuance INTEGER NOT NULL,
    burned INTEGER NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL
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
"""

# Per table: the hashed columns, and the column that says which block wrote the row (None: block 0).
_HASHED_TABLES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "meta": (("key", "value"), None),
    "accounts": (
        ("id", "name", "role", "subnet", "idx", "behaviour", "registered_block"),
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
}
_ALL_TABLES = ("blocks", *_HASHED_TABLES)
_BLOCK_TABLES = tuple(table for table, (_, column) in _HASHED_TABLES.items() if column == "block")


def _insert_sql(table: str) -> str:
    columns = _HASHED_TABLES[table][0]
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
            table: sorted((list(row) for row in rows.get(table, ())), key=_row_key)
            for table in _HASHED_TABLES
        },
    }
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Per-subnet state carried from epoch to epoch


@dataclass
class _SubnetState:
    """What a subnet's next epoch needs from the past; rebuilt from the database when a ledger reopens."""

    name: str
    miner_labels: list[str]
    epochs_run: int = 0
    prev_bonds_VM: torch.Tensor | None = None
    last_consensus_fixed: list[int] | None = None
    last_rows_u16: dict[int, list[int]] = field(default_factory=dict)
    failed_M: list[int] = field(default_factory=list)
    failed_steps_M: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.failed_M:
            self.failed_M = [0] * len(self.miner_labels)
            self.failed_steps_M = [0] * len(self.miner_labels)


@dataclass
class _BlockDraft:
    """Everything one block writes, built before the transaction and applied to memory after it."""

    height: int
    step: int
    emission: int
    rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=lambda: defaultdict(list))
    deltas: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    burned: int = 0
    subnet_updates: dict[str, dict[str, Any]] = field(default_factory=dict)

    def move(self, subnet: str, account: int, reason: str, amount: int) -> None:
        if amount:
            self.rows["payouts"].append((self.height, subnet, account, reason, amount))
            self.deltas[account] += amount


@dataclass(frozen=True)
class _EpochInputs:
    """What a validator's weight-setting behaviour may look at."""

    validator: int
    spec: ValidatorSpec
    subnet: _SubnetState
    epoch: int
    seed: int
    view_M: Callable[[], torch.Tensor]
    failing_M: torch.Tensor


def _honest_weights(inputs: _EpochInputs) -> torch.Tensor:
    """The validator's PoI view: negatives clipped to 0, failing miners zeroed (normalised by Yuma)."""
    view_M = torch.nan_to_num(inputs.view_M().detach().to("cpu", torch.float64), nan=0.0, posinf=0.0)
    return torch.where(inputs.failing_M, 0.0, view_M.clamp_min(0.0))


def _copier_weights(inputs: _EpochInputs) -> torch.Tensor:
    """Last epoch's consensus of the subnet (nothing before the first epoch)."""
    consensus = inputs.subnet.last_consensus_fixed
    num_miners = len(inputs.subnet.miner_labels)
    return (
        torch.tensor(consensus, dtype=torch.float64)
        if consensus
        else torch.zeros(num_miners, dtype=torch.float64)
    )


def _cabal_weights(inputs: _EpochInputs) -> torch.Tensor:
    """Everything on the cabal's own miners (indices outside this subnet are ignored)."""
    row_M = torch.zeros(len(inputs.subnet.miner_labels), dtype=torch.float64)
    members = [miner for miner in inputs.spec.cabal_miners if miner < row_M.numel()]
    row_M[members] = 1.0
    return row_M


def _random_weights(inputs: _EpochInputs) -> torch.Tensor:
    """Uniform noise, seeded by (run seed, validator, subnet, epoch) so a resumed run draws the same."""
    generator = torch.Generator().manual_seed(
        derive_seed(inputs.seed, "random", inputs.validator, inputs.subnet.name, inputs.epoch)
    )
    return torch.rand(len(inputs.subnet.miner_labels), generator=generator, dtype=torch.float64)


def _lazy_weights(inputs: _EpochInputs) -> torch.Tensor:
    """Honest once, at the subnet's first epoch; the same stale row ever after."""
    stale = inputs.subnet.last_rows_u16.get(inputs.validator)
    if inputs.subnet.epochs_run == 0 or stale is None:
        return _honest_weights(inputs)
    return torch.tensor(stale, dtype=torch.float64)


_WEIGHT_SETTERS: dict[str, Callable[[_EpochInputs], torch.Tensor]] = {
    "honest": _honest_weights,
    "weight_copier": _copier_weights,
    "cabal": _cabal_weights,
    "random": _random_weights,
    "lazy": _lazy_weights,
}


# ---------------------------------------------------------------------------------------------------------
# The writer


ScoreView = Callable[[int], Mapping[str, torch.Tensor]]


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
        self._subnets = {
            name: _SubnetState(name, [str(label) for label in subnets[name]]) for name in subnets
        }
        self._stake_V = torch.tensor([spec.stake for spec in self._cfg.validators], dtype=torch.float64)
        self._subnet_weights = _fraction_weights(
            [self._cfg.subnet_shares.get(name, 1.0) for name in self._subnet_names]
        )
        self._pool_weights = _fraction_weights(
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
        if not _has_tables(self._conn):
            self._create(genesis_step=resume_step or 0)
        else:
            self._check_meta()
            self._rollback_after(resume_step)
        self._load_state()
        self._step = self._last_block_step if resume_step is None else resume_step
        self._closed = False
        self._open_failed = {name: [0] * len(state.miner_labels) for name, state in self._subnets.items()}
        self._open_failed_steps = {
            name: [0] * len(state.miner_labels) for name, state in self._subnets.items()
        }
        logger.info("ledger %s open at block %d (step %d)", self._path, self._height, self._step)

    def _meta(self) -> dict[str, str]:
        config = {
            key: value
            for key, value in dataclasses.asdict(self._cfg).items()
            if key not in _RUNTIME_ONLY_FIELDS
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
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Statement by statement: executescript would commit and split the genesis transaction.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.executemany(_insert_sql("meta"), meta_rows)
            conn.executemany(_insert_sql("accounts"), accounts)
            conn.execute(
                "INSERT INTO blocks VALUES (?, ?, ?, ?, ?, ?, ?)",
                (0, genesis_step, 0, 0, 0, GENESIS_PREV_HASH, digest),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

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
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            for table in _BLOCK_TABLES:
                self._conn.execute(f"DELETE FROM {table} WHERE block > ?", (keep_height,))
            self._conn.execute("DELETE FROM blocks WHERE height > ?", (keep_height,))
            replayed = dict(self._conn.execute("SELECT account, SUM(amount) FROM payouts GROUP BY account"))
            self._conn.executemany(
                "UPDATE accounts SET balance = ? WHERE id = ?",
                [
                    (replayed.get(account, 0), account)
                    for (account,) in self._conn.execute("SELECT id FROM accounts")
                ],
            )
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
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

    def _load_subnet_state(self, state: _SubnetState) -> None:
        conn = self._conn
        epochs_run, last_epoch_block = conn.execute(
            "SELECT COUNT(*), COALESCE(MAX(block), 0) FROM epochs WHERE subnet = ?", (state.name,)
        ).fetchone()
        state.epochs_run = epochs_run
        num_validators, num_miners = len(self._cfg.validators), len(state.miner_labels)
        if epochs_run:
            bonds_VM = torch.zeros(num_validators, num_miners, dtype=torch.float64)
            for validator, miner, value in conn.execute(
                "SELECT validator, miner, value FROM bonds WHERE block = ? AND subnet = ?",
                (last_epoch_block, state.name),
            ):
                bonds_VM[validator, miner] = value / FIXED_ONE
            state.prev_bonds_VM = bonds_VM
            consensus = [0] * num_miners
            for uid, value in conn.execute(
                "SELECT uid, value FROM epoch_values WHERE block = ? AND subnet = ? AND kind = 'consensus'",
                (last_epoch_block, state.name),
            ):
                consensus[uid] = value
            state.last_consensus_fixed = consensus
            rows = {validator: [0] * num_miners for validator in range(num_validators)}
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
            counts_M = torch.as_tensor(counts).detach().to("cpu").reshape(-1).to(torch.int64).tolist()
            if len(counts_M) != len(self._subnets[layer].miner_labels):
                raise LedgerError(
                    f"failures[{layer!r}] has {len(counts_M)} entries, subnet has {len(self._subnets[layer].miner_labels)} miners"
                )
            for miner, count in enumerate(counts_M):
                if count > 0:
                    self._open_failed[layer][miner] += count
                    self._open_failed_steps[layer][miner] += 1

    def _close_block(self, score_view: ScoreView) -> None:
        draft = _BlockDraft(height=self._height + 1, step=self._step, emission=block_emission(self._issuance))
        self._accrue_emission(draft)
        self._draft_failures(draft)
        if draft.height % self._cfg.tempo == 0:
            views = _CachedViews(score_view)
            for name in self._subnet_names:
                self._run_epoch(draft, self._subnets[name], views)
        self._commit(draft)
        self._apply(draft)

    def _accrue_emission(self, draft: _BlockDraft) -> None:
        for name, subnet_amount in zip(
            self._subnet_names, apportion(draft.emission, self._subnet_weights), strict=True
        ):
            for pool, amount in zip(POOLS, apportion(subnet_amount, self._pool_weights), strict=True):
                draft.move(name, self._account_ids[f"pending/{name}/{pool}"], "emission", amount)
        if sum(draft.deltas.values()) != draft.emission:
            # Only when there is no subnet or every subnet share is 0: nobody may receive the emission.
            draft.burned += draft.emission - sum(draft.deltas.values())

    def _draft_failures(self, draft: _BlockDraft) -> None:
        for name in self._subnet_names:
            for miner, (failed, steps) in enumerate(
                zip(self._open_failed[name], self._open_failed_steps[name], strict=True)
            ):
                if failed:
                    draft.rows["failures"].append((draft.height, name, miner, failed, steps))

    def _run_epoch(self, draft: _BlockDraft, state: _SubnetState, views: _CachedViews) -> None:
        """Collect weights, run Yuma, pay the subnet's pending pools; record everything in ``draft``."""
        name, height = state.name, draft.height
        epoch = height // self._cfg.tempo
        failing_M = self._failing_miners(state)
        rows_u16 = [
            _to_u16_row(self._weight_row(validator, spec, state, epoch, views, failing_M))
            for validator, spec in enumerate(self._cfg.validators)
        ]
        num_validators, num_miners = len(rows_u16), len(state.miner_labels)
        weights_VM = torch.tensor(rows_u16, dtype=torch.float64).reshape(num_validators, num_miners)
        result = yuma_epoch(
            weights_VM,
            self._stake_V,
            state.prev_bonds_VM,
            kappa=self._cfg.kappa,
            bond_alpha=self._cfg.bond_alpha,
            bonds_penalty=self._cfg.bonds_penalty,
            yuma3=self._cfg.yuma3,
            liquid_alpha=self._cfg.liquid_alpha,
        )
        consensus = _to_fixed(result.consensus)
        incentive = _to_fixed(result.incentive)
        dividends = _to_fixed(result.dividends)
        bonds_VM = _to_fixed(result.bonds.reshape(-1))

        miner_pool = self._balance(draft, f"pending/{name}/miners")
        validator_pool = self._balance(draft, f"pending/{name}/validators")
        owner_pool = self._balance(draft, f"pending/{name}/owner")
        miner_paid, miner_burned = self._pay(
            draft, name, "miners", miner_pool, incentive, "miner", "incentive"
        )
        dividends_by_stake = sum(dividends) == 0
        validator_shares = _to_fixed(result.stake) if dividends_by_stake else dividends
        validator_paid, validator_burned = self._pay(
            draft, name, "validators", validator_pool, validator_shares, "validator", "dividend"
        )
        self._pay(draft, name, "owner", owner_pool, [1], "owner", "owner")
        carried = (miner_pool - miner_paid - miner_burned) + (
            validator_pool - validator_paid - validator_burned
        )
        burned = miner_burned + validator_burned

        epoch_row = (miner_pool, miner_paid, validator_pool, validator_paid, owner_pool, carried, burned)
        draft.rows["epochs"].append((height, name, epoch, *epoch_row, int(dividends_by_stake)))
        values = draft.rows["epoch_values"]
        values += [(height, name, "consensus", j, v) for j, v in enumerate(consensus)]
        values += [(height, name, "incentive", j, v) for j, v in enumerate(incentive)]
        values += [(height, name, "dividends", i, v) for i, v in enumerate(dividends)]
        values += [
            (height, name, "validator_trust", i, v) for i, v in enumerate(_to_fixed(result.validator_trust))
        ]
        draft.rows["weights"] += [
            (height, name, i, j, value)
            for i, row in enumerate(rows_u16)
            for j, value in enumerate(row)
            if value
        ]
        draft.rows["bonds"] += [
            (height, name, flat // max(num_miners, 1), flat % max(num_miners, 1), value)
            for flat, value in enumerate(bonds_VM)
            if value
        ]
        draft.subnet_updates[name] = {"consensus": consensus, "bonds": bonds_VM, "rows": rows_u16}
        logger.debug("epoch %d of subnet %s: incentive %s, dividends %s", epoch, name, incentive, dividends)

    def _failing_miners(self, state: _SubnetState) -> torch.Tensor:
        """Miners that failed more often than they answered during this epoch's steps."""
        epoch_steps = self._cfg.tempo * self._cfg.steps_per_block
        failed_M = [
            done + now for done, now in zip(state.failed_M, self._open_failed[state.name], strict=True)
        ]
        failed_steps_M = [
            done + now
            for done, now in zip(state.failed_steps_M, self._open_failed_steps[state.name], strict=True)
        ]
        return torch.tensor(
            [failed > epoch_steps - steps for failed, steps in zip(failed_M, failed_steps_M, strict=True)],
            dtype=torch.bool,
        )

    def _weight_row(
        self,
        validator: int,
        spec: ValidatorSpec,
        state: _SubnetState,
        epoch: int,
        views: _CachedViews,
        failing_M: torch.Tensor,
    ) -> torch.Tensor:
        def view_M() -> torch.Tensor:
            return views.layer(validator, state.name, len(state.miner_labels))

        inputs = _EpochInputs(validator, spec, state, epoch, self._seed, view_M, failing_M)
        return _WEIGHT_SETTERS[spec.behaviour](inputs)

    def _balance(self, draft: _BlockDraft, account_name: str) -> int:
        account = self._account_ids[account_name]
        return self._balances[account] + draft.deltas[account]

    def _pay(
        self,
        draft: _BlockDraft,
        subnet: str,
        pool: str,
        amount: int,
        shares: Sequence[int],
        role: str,
        reason: str,
    ) -> tuple[int, int]:
        """Pay ``amount`` from a pending pool pro rata to ``shares``; burn it if nobody has a share.

        Returns (paid, burned); the rest stays pending (carried to the next epoch).
        """
        source = self._account_ids[f"pending/{subnet}/{pool}"]
        if amount == 0:
            return 0, 0
        if sum(shares) == 0:
            draft.move(subnet, source, "burn", -amount)
            draft.burned += amount
            return 0, amount
        payouts = pro_rata_floor(amount, shares)
        for index, payout in enumerate(payouts):
            draft.move(subnet, self._recipient(role, subnet, index), reason, payout)
        paid = sum(payouts)
        draft.move(subnet, source, "distribute", -paid)
        return paid, 0

    def _recipient(self, role: str, subnet: str, index: int) -> int:
        if role == "owner":
            return self._account_ids["owner"]
        if role == "validator":
            return self._account_ids[f"validator/{index}"]
        return self._account_ids[f"miner/{subnet}/{index}"]

    # -- writing --------------------------------------------------------------------------------------------

    def _commit(self, draft: _BlockDraft) -> None:
        """Write the block and its rows in one transaction."""
        issuance = self._issuance + draft.emission
        burned = self._burned + draft.burned
        digest = block_hash(
            draft.height, draft.step, draft.emission, issuance, burned, self._last_hash, draft.rows
        )
        updates = [
            (self._balances[account] + delta, account) for account, delta in draft.deltas.items() if delta
        ]
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for table, rows in draft.rows.items():
                conn.executemany(_insert_sql(table), rows)
            conn.executemany("UPDATE accounts SET balance = ? WHERE id = ?", updates)
            conn.execute(
                "INSERT INTO blocks VALUES (?, ?, ?, ?, ?, ?, ?)",
                (draft.height, draft.step, draft.emission, issuance, burned, self._last_hash, digest),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._last_hash = digest

    def _apply(self, draft: _BlockDraft) -> None:
        """Move the committed block into memory (only after the transaction succeeded)."""
        self._height = draft.height
        self._last_block_step = draft.step
        self._issuance += draft.emission
        self._burned += draft.burned
        for account, delta in draft.deltas.items():
            self._balances[account] += delta
        for name, state in self._subnets.items():
            for miner in range(len(state.miner_labels)):
                state.failed_M[miner] += self._open_failed[name][miner]
                state.failed_steps_M[miner] += self._open_failed_steps[name][miner]
                self._open_failed[name][miner] = 0
                self._open_failed_steps[name][miner] = 0
        for name, update in draft.subnet_updates.items():
            self._apply_epoch(self._subnets[name], update)

    def _apply_epoch(self, state: _SubnetState, update: dict[str, Any]) -> None:
        num_validators, num_miners = len(self._cfg.validators), len(state.miner_labels)
        state.epochs_run += 1
        state.last_consensus_fixed = update["consensus"]
        state.last_rows_u16 = dict(enumerate(update["rows"]))
        # The same integer-to-float path as on reopening, so a resumed run computes identical bonds.
        bonds = torch.tensor(update["bonds"], dtype=torch.int64).reshape(num_validators, num_miners)
        state.prev_bonds_VM = bonds.to(torch.float64) / FIXED_ONE
        state.failed_M = [0] * num_miners
        state.failed_steps_M = [0] * num_miners

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


class _CachedViews:
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


def _has_tables(conn: sqlite3.Connection) -> bool:
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    present = names & set(_ALL_TABLES)
    if present and present != set(_ALL_TABLES):
        raise LedgerError(f"ledger is missing tables {sorted(set(_ALL_TABLES) - present)}")
    return bool(present)


# ---------------------------------------------------------------------------------------------------------
# Reading: summary, verify, export


def summarise(conn: sqlite3.Connection) -> dict[str, Any]:
    """The reward summary of a ledger connection (see ``RewardLedger.summary``)."""
    if not _has_tables(conn):
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
        columns, block_column = _HASHED_TABLES[table]
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
    block = row[-1] if _HASHED_TABLES[table][1] else 0
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
    if not path.exists():
        raise LedgerError(f"ledger {path} does not exist")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        conn.execute("BEGIN")  # one read snapshot, even while a writer is running
        if not _has_tables(conn):
            return VerifyReport(blocks=0, epochs=0, issuance=0, burned=0, accounts=0)
        report = _verify_chain(conn)
        _verify_balances(conn, report)
        return report
    except sqlite3.DatabaseError as error:
        raise LedgerError(f"ledger {path} cannot be read: {error}") from error
    finally:
        conn.close()


def _verify_chain(conn: sqlite3.Connection) -> VerifyReport:
    tables = {table: _RowsByBlock(conn, table) for table in _HASHED_TABLES}
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
    if not path.exists():
        raise LedgerError(f"ledger {path} does not exist")
    out = Path(out_dir) if out_dir is not None else path.with_name(path.stem + "_csv")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        if not _has_tables(conn):
            raise LedgerError(f"ledger {path} has no tables")
        for table in _ALL_TABLES:
            cursor = conn.execute(f"SELECT * FROM {table}")
            target = out / f"{table}.csv"
            with target.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(column[0] for column in cursor.description)
                writer.writerows(cursor)
            written.append(target)
    finally:
        conn.close()
    return written


def _format_summary(path: Path, summary: Mapping[str, Any]) -> str:
    lines = [
        f"ledger {path}: {summary['blocks']} blocks, {summary['epochs']} epochs, "
        f"issuance {summary['issuance_tokens']:.9f} tokens, burned {summary['burned_tokens']:.9f} tokens",
        "balances by role (tokens):",
    ]
    lines += [f"  {role:<28} {amount['tokens']:>20.9f}" for role, amount in summary["by_role"].items()]
    lines.append("balances by behaviour (tokens):")
    lines += [f"  {key:<28} {amount['tokens']:>20.9f}" for key, amount in summary["by_behaviour"].items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m moe.ledger verify PATH | show PATH | export PATH [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m moe.ledger", description="Inspect a poimoe reward ledger."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("verify", help="recompute the hash chain and the invariant").add_argument("path")
    commands.add_parser("show", help="print balances by role and behaviour").add_argument("path")
    export = commands.add_parser("export", help="write every table as CSV")
    export.add_argument("path")
    export.add_argument("--out", default=None, help="output folder (default: <ledger stem>_csv next to it)")
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            print(verify_ledger(args.path))
        elif args.command == "show":
            print(_format_summary(Path(args.path), read_summary(Path(args.path))))
        else:
            for target in export_ledger(args.path, args.out):
                print(target)
    except LedgerError as error:
        print(f"ledger error: {error}", file=sys.stderr)
        return 1
    return 0


def read_summary(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise LedgerError(f"ledger {path} does not exist")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return summarise(conn)
    finally:
        conn.close()


def iter_blocks(path: str | os.PathLike[str]) -> Iterator[tuple[int, int, int, int, int]]:
    """Yield ``(height, step, emission, issuance, burned)`` per block, for reports and plots."""
    conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    try:
        yield from conn.execute("SELECT height, step, emission, issuance, burned FROM blocks ORDER BY height")
    finally:
        conn.close()

