"""Row buckets: an expert call sees one of a few row counts, so per-shape kernels are built once.

Under CPU bf16 autocast, torch 2.13 runs matmuls and GELU through oneDNN kernels that are compiled per
exact shape and cached. An expert's row count is its routed token count, new almost every step, so
without buckets most of a bf16 step is spent compiling kernels (≈ 100 a step at the default size,
≈ 1 ms each; issue 15). `RowBuckets` pads an expert's rows with zeros up to the next bucket of a
geometric series (`minimum · growth^k`, rounded up to `ALIGN` rows) and slices the output back.

Experts are row-wise (each output row depends on its own input row only), and the padded rows' output
is sliced off, so they receive zero gradient: they add exact zeros to the outputs, to the input
gradients and to every parameter gradient. What can differ is the order the BLAS sums in, which it
chooses from the shape; `tests/experts/test_rows.py` checks both (bit-exact where sums do not depend on
the order, within rounding otherwise).

`experts.row_buckets`: `auto` (default) pads only calls computed under CPU autocast, where it pays;
fp32 calls and GPU calls are left exactly as they were. `off` never pads; `on` always pads with
`DEFAULT_GROWTH`; a number in (1, 4] always pads with that growth factor.

Legend: a one expert's rows, b those rows padded to their bucket, D model width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from experts.errors import ConfigError

DEFAULT_GROWTH = 2**0.25  # four buckets per doubling: ≤ 19 % padding, ~8 buckets from 16 to 4096 rows
MINIMUM_ROWS = 16  # every call of fewer rows pads to this
ALIGN = 16  # buckets are multiples of 16 rows (one AMX tile of bf16)
MAX_GROWTH = 4.0  # above it a bucket can be four times the rows: more padding than any compile saves
SPECS = f"auto, off, on, or a growth factor in (1, {MAX_GROWTH:g}]"
_YAML_BOOLEANS = {"false": "off", "true": "on"}  # YAML reads `row_buckets: off` as false


@dataclass
class ComputeSettings:
    """How an owner computes its expert's rows; sent to workers when they host an expert.
    `ExpertsConfig` inherits it (`experts.row_buckets`)."""

    row_buckets: str = "auto"  # auto | off | on | a growth factor in (1, 4]: see experts/rows.py


@dataclass(frozen=True)
class RowBuckets:
    """Where an expert call's rows are padded to: `growth` None never pads; `auto` pads only under CPU
    autocast."""

    growth: float | None = DEFAULT_GROWTH
    auto: bool = True
    minimum: int = MINIMUM_ROWS

    @classmethod
    def parse(cls, spec: object) -> RowBuckets:
        """`experts.row_buckets` (auto | off | on | a growth factor > 1) as RowBuckets; ConfigError otherwise."""
        text = _YAML_BOOLEANS.get(str(spec).strip().lower(), str(spec).strip().lower())
        if text in ("auto", "off", "on"):
            return cls(growth=None if text == "off" else DEFAULT_GROWTH, auto=text == "auto")
        try:
            growth = float(text)
        except ValueError:
            growth = math.nan
        if not 1 < growth <= MAX_GROWTH:
            raise ConfigError(f"experts.row_buckets={spec!r}; valid: {SPECS}")
        return cls(growth=growth, auto=False)

    def applies(self, x_aD: torch.Tensor) -> bool:
        """Whether a call on `x_aD` is padded: never when off or empty; under `auto`, only under CPU autocast."""
        if self.growth is None or x_aD.shape[0] == 0:
            return False
        return not self.auto or (x_aD.device.type == "cpu" and torch.is_autocast_enabled("cpu"))

    def rows(self, count: int) -> int:
        """The bucket of `count` rows: the smallest `minimum · growth^k`, rounded up to ALIGN, ≥ count."""
        if count <= self.minimum:
            return self.minimum
        k = max(0, math.floor(math.log(count / self.minimum, self.growth)) - 1)  # - 1: the log may round up
        while self.bucket(k) < count:
            k += 1
        return self.bucket(k)

    def bucket(self, k: int) -> int:
        return -(-math.ceil(self.minimum * self.growth**k) // ALIGN) * ALIGN

    def call(self, expert: Callable[[torch.Tensor], torch.Tensor], x_aD: torch.Tensor) -> torch.Tensor:
        """`expert(x_aD)`, computed on `x_aD` padded with zero rows to its bucket when `applies`."""
        if not self.applies(x_aD):
            return expert(x_aD)
        count, padded = x_aD.shape[0], self.rows(x_aD.shape[0])
        if padded == count:
            return expert(x_aD)
        y_bD = expert(torch.cat([x_aD, x_aD.new_zeros(padded - count, x_aD.shape[1])]))
        return y_bD[:count]
