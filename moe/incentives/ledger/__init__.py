"""The reward ledger: TAO-style emission, Yuma epochs over the validators' weights, a hash-chained SQLite record.

Modules: ``config`` (LedgerConfig, ValidatorSpec), ``emission`` (units, schedule, exact splits),
``schema`` (tables, block hashing, the file), ``signing`` (keys and signed messages), ``validators``
(weight rules per behaviour), ``submissions`` (signed rows, commit-reveal), ``epoch`` (a block's draft, a
subnet's epoch and payouts), ``audits`` (failed audits, slashes, bans), ``payments`` (the treasury and
compute payments to providers), ``writer`` (RewardLedger), ``anchor`` (the head and its copies),
``replay`` (the writer's accounting re-run on a ledger), ``verify``, ``summary`` (summary, export) and
``cli`` (``python -m moe.ledger``).
"""

from moe.incentives.ledger.anchor import LEDGER_FILE, Anchor
from moe.incentives.ledger.cli import main
from moe.incentives.ledger.config import LedgerConfig, ValidatorSpec, as_ledger_config
from moe.incentives.ledger.emission import SUPPLY_CAP, TOKEN, WEIGHT_MAX, apportion, block_emission
from moe.incentives.ledger.epoch import ScoreView
from moe.incentives.ledger.signing import KEYS_DIR_ENV, default_keys_dir
from moe.incentives.ledger.summary import export_ledger, iter_blocks, read_summary
from moe.incentives.ledger.verify import VerifyReport, verify_ledger, verify_run
from moe.incentives.ledger.writer import RewardLedger

__all__ = [
    "KEYS_DIR_ENV",
    "LEDGER_FILE",
    "SUPPLY_CAP",
    "TOKEN",
    "WEIGHT_MAX",
    "Anchor",
    "LedgerConfig",
    "RewardLedger",
    "ScoreView",
    "ValidatorSpec",
    "VerifyReport",
    "apportion",
    "as_ledger_config",
    "block_emission",
    "default_keys_dir",
    "export_ledger",
    "iter_blocks",
    "main",
    "read_summary",
    "verify_ledger",
    "verify_run",
]
