"""User-facing errors of every package, in one place for the CLIs: raised for bad input, reported as one
line without a traceback. Each package defines its own (`router.errors`, `experts.errors`)."""

from experts.errors import CheckpointError, WireError
from router.errors import ConfigError, PoimoeError

__all__ = ["CheckpointError", "ConfigError", "DataError", "LedgerError", "PoimoeError", "WireError"]


class DataError(PoimoeError):
    """A data file is missing, empty or unreadable; the message names the file."""


class LedgerError(PoimoeError):
    """A ledger is tampered, locked or inconsistent; the message names the block or invariant."""
