"""Units and integer arithmetic of the ledger: the emission schedule, exact splits, fixed-point encodings.

Amounts are Python integers in base units (1 token = 10**9 units) so that no rounding ever creates or
destroys value; fractions from consensus are stored as integers in units of 1e-9, weight rows as u16.

Shape legend: M = miners of one subnet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

TOKEN = 10**9
SUPPLY_CAP = 21_000_000 * TOKEN
# Fractions (consensus, incentive, dividends, trust, bonds) are stored as integers in units of 1e-9.
FIXED_ONE = 10**9
# Weight rows are stored as on chain: u16, scaled so the row's largest weight is 65535.
WEIGHT_MAX = 65_535


def block_emission(issuance: int) -> int:
    """Units minted by the next block, given the units issued so far.

    1 token per block while issuance < 10.5M tokens, halving each time issuance crosses
    ``21M·(1 − 2^−k)`` (era k pays ``10**9 >> k`` units), and 0 from the 21M cap on. Exact integers: the
    era is the largest k with ``(cap − issuance)·2^k ≤ cap``, i.e. ``floor(log2(cap // remaining))``.
    Era 30 and later pay 0 units, so issuance stops about 0.02 tokens short of the cap.
    """
    if issuance < 0:
        raise ValueError(f"issuance must be non-negative, got {issuance}")
    remaining = SUPPLY_CAP - issuance
    if remaining <= 0:
        return 0
    era = (SUPPLY_CAP // remaining).bit_length() - 1
    return min(TOKEN >> era, remaining)


def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` units in proportion to integer ``weights`` exactly (largest remainder, ties by index)."""
    weight_sum = sum(weights)
    if total == 0 or weight_sum == 0:
        return [0] * len(weights)
    parts = [total * weight // weight_sum for weight in weights]
    leftover = total - sum(parts)
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % weight_sum), i))
    for index in by_remainder[:leftover]:
        parts[index] += 1
    return parts


def pro_rata_floor(pool: int, shares: Sequence[int]) -> list[int]:
    """``floor(pool · share / Σ shares)`` each; the caller carries ``pool − Σ result``."""
    share_sum = sum(shares)
    if share_sum == 0:
        return [0] * len(shares)
    return [pool * share // share_sum for share in shares]


def to_fixed(values: torch.Tensor) -> list[int]:
    """Fractions as integers in units of 1e-9 (how the ledger stores them)."""
    return torch.round(values.to(torch.float64) * FIXED_ONE).to(torch.int64).tolist()


def fraction_weights(values: Sequence[float]) -> list[int]:
    """Relative shares (floats) as integer weights for ``apportion``."""
    return [round(value * FIXED_ONE) for value in values]


def to_u16_row(row_M: torch.Tensor) -> list[int]:
    """Scale a non-negative row so its maximum is ``WEIGHT_MAX`` and round (how the chain stores weights)."""
    row_M = torch.nan_to_num(row_M.detach().to("cpu", torch.float64), nan=0.0, posinf=0.0).clamp_min(0.0)
    peak = float(row_M.max()) if row_M.numel() else 0.0
    if peak <= 0.0:
        return [0] * row_M.numel()
    return torch.round(row_M / peak * WEIGHT_MAX).to(torch.int64).tolist()
