"""Errors raised by the experts package: bad frames on the wire, unreadable expert state, bad keys."""

from router.errors import ConfigError, PoimoeError

__all__ = ["CheckpointError", "ConfigError", "IdentityError", "OfferError", "PoimoeError", "WireError"]


class CheckpointError(PoimoeError):
    """A checkpoint is missing or corrupt; the message names the path."""


class WireError(PoimoeError):
    """A malformed network frame; the message says what was wrong with it."""


class IdentityError(PoimoeError):
    """A key file or public key is missing, malformed or readable by others; the message names it."""


class OfferError(PoimoeError):
    """A market offer is unsigned, forged or malformed; the message names the provider and the fault."""
