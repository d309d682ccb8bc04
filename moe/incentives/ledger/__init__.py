"""The reward ledger: TAO-style emission, Yuma epochs over the validators' weights, a hash-chained SQLite record.

Modules: ``config`` (LedgerConfig, ValidatorSpec), ``emission`` (units, schedule, exact splits),
``schema`` (tables and block hashing), ``validators`` (weight rules per behaviour), ``epoch`` (a block's
draft, a subnet's epoch and payouts), ``writer`` (RewardLedger), ``verify`` (summary, verification,
export) and ``cli`` (``python -m moe.ledger``).
"""

from moe.incentives.ledger.cli import main
from moe.incentives.ledger.config import LedgerConfig, ValidatorSpec, as_ledger_config
from moe.incentives.ledger.emission import SUPPLY_CAP, TOKEN, WEIGHT_MAX, apportion, block_emission
from moe.incentives.ledger.epoch import ScoreView
from moe.incentives.ledger.verify import VerifyReport, export_ledger, iter_blocks, read_summary, verify_ledger
from moe.incentives.ledger.writer import RewardLedger

__all__ = [
    "SUPPLY_CAP",
    "TOKEN",
    "WEIGHT_MAX",
    "LedgerConfig",
    "RewardLedger",
    "ScoreView",
    "ValidatorSpec",
    "VerifyReport",
    "apportion",
    "as_ledger_config",
    "block_emission",
    "export_ledger",
    "iter_blocks",
    "main",
    "read_summary",
    "verify_ledger",
]
