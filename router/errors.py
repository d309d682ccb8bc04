"""The error base every package shares: it lives here because `router` is the lowest package.

Errors caused by the user's input (configs, files, checkpoints, frames, ledgers) derive from
`PoimoeError`; the CLIs report them as one line without a traceback. `experts.errors` and
`moe.errors` add the error types of their own packages.
"""


class PoimoeError(Exception):
    """Base class for errors caused by the user's input (config, files, checkpoints, ledgers)."""


class ConfigError(PoimoeError):
    """A config value is invalid; the message names the key and the bad value."""
