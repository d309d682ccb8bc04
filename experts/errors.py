"""Errors raised by the experts package: bad frames on the wire and unreadable expert state."""

from router.errors import ConfigError, PoimoeError

__all__ = ["CheckpointError", "ConfigError", "PoimoeError", "WireError"]


class CheckpointError(PoimoeError):
    """A checkpoint is missing or corrupt; the message names the path."""


class WireError(PoimoeError):
    """A malformed network frame; the message says what was wrong with it."""
