"""The reward ledger: TAO-style emission, Yuma epochs over the validators' weights, a hash-chained SQLite record."""

from moe.incentives.ledger.writer import (
    SUPPLY_CAP,
    TOKEN,
    WEIGHT_MAX,
    LedgerConfig,
    RewardLedger,
    ValidatorSpec,
    apportion,
    as_ledger_config,
    block_emission,
    export_ledger,
    iter_blocks,
    main,
    read_summary,
    verify_ledger,
)

__all__ = [
    "SUPPLY_CAP",
    "TOKEN",
    "WEIGHT_MAX",
    "LedgerConfig",
    "RewardLedger",
    "ValidatorSpec",
    "apportion",
    "as_ledger_config",
    "block_emission",
    "export_ledger",
    "iter_blocks",
    "main",
    "read_summary",
    "verify_ledger",
]
