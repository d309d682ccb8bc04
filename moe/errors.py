"""User-facing errors: raised for bad input, reported by the CLIs as one line without a traceback."""


class PoimoeError(Exception):
    """Base class for errors caused by the user's input (config, files, checkpoints, ledgers)."""


class ConfigError(PoimoeError):
    """A config value is invalid; the message names the key and the bad value."""


class DataError(PoimoeError):
    """A data file is missing, empty or unreadable; the message names the file."""


class CheckpointError(PoimoeError):
    """A checkpoint is missing or corrupt; the message names the path."""


class LedgerError(PoimoeError):
    """A ledger is tampered, locked or inconsistent; the message names the block or invariant."""


class WireError(PoimoeError):
    """A malformed network frame; the message says what was wrong with it."""
