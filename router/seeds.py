"""Every sub-seed in poimoe is derived here from `(seed, *names)`, the same in every process and install.

Python's `hash()` is salted per process, and ad-hoc digests drift apart, so one helper owns the rule:
BLAKE2b over the parts' `repr`, 63 bits (a valid `torch.Generator` seed).
It lives in `router` because that is the lowest package that draws random numbers.
"""

from __future__ import annotations

import hashlib
import random

import torch


def derive_seed(seed: int, *names: object) -> int:
    """A 63-bit seed for the stream named `names` under the run's `seed`."""
    digest = hashlib.blake2b(repr((seed, *names)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def torch_generator(seed: int, *names: object) -> torch.Generator:
    """A fresh CPU generator for the stream `(seed, *names)`."""
    return torch.Generator().manual_seed(derive_seed(seed, *names))


def python_rng(seed: int, *names: object) -> random.Random:
    """A fresh `random.Random` for the stream `(seed, *names)`."""
    return random.Random(derive_seed(seed, *names))
