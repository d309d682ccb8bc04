"""The ledger's typed config (Hydra group ``ledger``) and its validation.

The dataclasses are the single source of defaults and types; ``configs/ledger/*.yaml`` hold only the
values that differ. ``as_ledger_config`` types any config node with ``router.typed_config`` and then
checks the ranges, so ``stake: 600`` and ``stake: 600.0`` give the same ledger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from moe.errors import ConfigError
from moe.incentives.ledger.emission import TOKEN
from router.typed_config import plain, typed_config

BEHAVIOURS = ("honest", "weight_copier", "cabal", "random", "lazy")
SYNCHRONOUS_MODES = ("normal", "full")
# Config fields that do not change what the ledger records, so a resumed run may change them.
RUNTIME_ONLY_FIELDS = ("enabled", "synchronous", "keys_dir")


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
    """The training run is validator 0; two more validators, one of them copying the consensus."""
    return [
        ValidatorSpec(stake=600.0, behaviour="honest"),
        ValidatorSpec(stake=250.0, behaviour="honest"),
        ValidatorSpec(stake=150.0, behaviour="weight_copier"),
    ]


@dataclass
class LedgerConfig:
    """Typed config of the reward ledger (Hydra group ``ledger``).

    One block every ``steps_per_block`` training steps, one epoch every ``tempo`` blocks. Yuma
    consensus follows Bittensor's subtensor semantics (``kappa``, ``bond_alpha``, ``bonds_penalty``).
    """

    enabled: bool = True
    steps_per_block: int = 1
    tempo: int = 10
    # Per-block split of emission (relative weights, normalised here).
    owner_share: float = 0.18
    miner_share: float = 0.41
    validator_share: float = 0.41
    kappa: float = 0.5
    bond_alpha: float = 0.1
    bonds_penalty: float = 1.0
    yuma3: bool = False
    # yuma3 only: [alpha_low, alpha_high] or [alpha_low, alpha_high, steepness].
    liquid_alpha: list[float] | None = None
    # The training run is validator 0. Behaviours: honest, weight_copier, cabal, random, lazy.
    validators: list[ValidatorSpec] = field(default_factory=_default_validators)
    # Relative share of emission per subnet (MoE layer name); unlisted subnets weigh 1.
    subnet_shares: dict[str, float] = field(default_factory=dict)
    # WAL durability: normal (survives a killed process; the last blocks may be lost on power loss)
    # or full (fsync every block).
    synchronous: str = "normal"
    # Validators commit a salted hash of their weights at an epoch and reveal them at the next; Yuma
    # counts revealed weights only (Bittensor's defence against weight copying).
    commit_reveal: bool = False
    # Folder of the ledger writer's private key (ledger_writer.key, mode 0600), never inside the run
    # dir. None: $POIMOE_KEYS_DIR, else $XDG_CONFIG_HOME/poimoe/keys, else ~/.config/poimoe/keys.
    keys_dir: str | None = None
    # Tokens funded to the owner's treasury at genesis, from which compute payments are made (issue 16's
    # market; the engine fills it from market.treasury). A multiple of 1e-9 (one base unit), >= 0.
    treasury: float = 0.0


def as_ledger_config(cfg: Any) -> LedgerConfig:
    """A validated ``LedgerConfig`` from a ``LedgerConfig``, an OmegaConf node or a plain mapping.

    Always re-typed (an instance too), so numbers take their field types and the stored config of a
    ledger does not depend on how a number was written.
    """
    typed = typed_config(LedgerConfig, plain(cfg), "ledger")
    validate_config(typed)
    return typed


def validate_config(cfg: LedgerConfig) -> None:
    """Raise ``ConfigError`` naming the first invalid key."""
    if cfg.steps_per_block < 1:
        raise ConfigError(f"ledger.steps_per_block must be >= 1, got {cfg.steps_per_block}")
    if cfg.tempo < 1:
        raise ConfigError(f"ledger.tempo must be >= 1, got {cfg.tempo}")
    _validate_shares(cfg)
    for key in ("kappa", "bond_alpha", "bonds_penalty"):
        value = getattr(cfg, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"ledger.{key} must lie in [0, 1], got {value}")
    _validate_liquid_alpha(cfg)
    if not cfg.validators:
        raise ConfigError("ledger.validators must list at least one validator")
    for index, spec in enumerate(cfg.validators):
        _validate_validator(index, spec)
    units_of(cfg.treasury, "ledger.treasury")
    if cfg.synchronous not in SYNCHRONOUS_MODES:
        raise ConfigError(
            f"ledger.synchronous must be one of {list(SYNCHRONOUS_MODES)}, got {cfg.synchronous!r}"
        )


def _validate_shares(cfg: LedgerConfig) -> None:
    shares = {
        "owner_share": cfg.owner_share,
        "miner_share": cfg.miner_share,
        "validator_share": cfg.validator_share,
    }
    for key, value in shares.items():
        _require_non_negative(f"ledger.{key}", value)
    if sum(shares.values()) <= 0:
        raise ConfigError("ledger.owner_share + miner_share + validator_share must be > 0")
    for name, weight in cfg.subnet_shares.items():
        _require_non_negative(f"ledger.subnet_shares.{name}", weight)


def _validate_liquid_alpha(cfg: LedgerConfig) -> None:
    if cfg.liquid_alpha is None:
        return
    if not cfg.yuma3:
        raise ConfigError("ledger.liquid_alpha needs ledger.yuma3=true")
    values = list(cfg.liquid_alpha)
    if len(values) not in (2, 3) or not 0.0 <= values[0] <= values[1] <= 1.0:
        raise ConfigError(f"ledger.liquid_alpha must be [low, high] or [low, high, steepness], got {values}")


def _validate_validator(index: int, spec: ValidatorSpec) -> None:
    key = f"ledger.validators[{index}]"
    if spec.behaviour not in BEHAVIOURS:
        raise ConfigError(f"{key}.behaviour: unknown {spec.behaviour!r}; valid: {', '.join(BEHAVIOURS)}")
    _require_non_negative(f"{key}.stake", spec.stake)
    if spec.behaviour == "cabal" and not spec.cabal_miners:
        raise ConfigError(f"{key}: a cabal validator needs cabal_miners (miner indices)")
    if any(miner < 0 for miner in spec.cabal_miners):
        raise ConfigError(f"{key}.cabal_miners must be non-negative, got {spec.cabal_miners}")


def _require_non_negative(key: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{key} must be a non-negative number, got {value}")


def units_of(tokens: float, key: str) -> int:
    """``tokens`` in base units (1e-9 token); ``ConfigError`` naming ``key`` unless it is a non-negative
    whole number of units, so the ledger never rounds an amount it was given."""
    _require_non_negative(key, tokens)
    scaled = tokens * TOKEN
    if not math.isclose(scaled, round(scaled), rel_tol=1e-12, abs_tol=1e-6):
        raise ConfigError(f"{key} must be a multiple of 1e-9 (one base unit), got {tokens}")
    return round(scaled)


def treasury_units(cfg: LedgerConfig) -> int:
    """The units funded to the treasury at genesis."""
    return units_of(cfg.treasury, "ledger.treasury")
