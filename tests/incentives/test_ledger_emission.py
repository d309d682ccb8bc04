"""Ledger units and integer arithmetic (moe.incentives.ledger.emission): schedule, exact splits, u16 rows."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moe.incentives.ledger.emission import FIXED_ONE, pro_rata_floor, to_fixed, to_u16_row
from moe.ledger import SUPPLY_CAP, TOKEN, WEIGHT_MAX, apportion, block_emission


@pytest.mark.parametrize(
    ("issuance", "emission"),
    [
        (0, 10**9),
        (10_500_000 * TOKEN - 1, 10**9),
        (10_500_000 * TOKEN, 500_000_000),
        (15_750_000 * TOKEN, 250_000_000),
        (20_900_000 * TOKEN, 7_812_500),  # era 7: 21M − 20.9M = 0.1M ∈ (21M/2^8, 21M/2^7]
        (SUPPLY_CAP - 1, 0),
        (SUPPLY_CAP, 0),
        (SUPPLY_CAP + 5, 0),
    ],
)
def test_block_emission_schedule(issuance, emission):
    assert block_emission(issuance) == emission
    assert isinstance(block_emission(issuance), int)


def test_emission_halves_exactly_at_each_threshold():
    for era in range(1, 10):
        threshold = SUPPLY_CAP - SUPPLY_CAP // 2**era
        assert block_emission(threshold - 1) == TOKEN >> (era - 1)
        assert block_emission(threshold) == TOKEN >> era


@given(st.integers(0, 10**15), st.lists(st.integers(0, 10**9), min_size=1, max_size=6))
def test_apportion_is_exact(total, weights):
    parts = apportion(total, weights)
    assert sum(parts) == (total if any(weights) else 0)
    assert all(part >= 0 for part in parts)


def test_apportion_gives_the_leftover_to_the_largest_remainders_then_the_first():
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert apportion(7, [2, 1]) == [5, 2]  # remainders 14 % 3 = 2 and 7 % 3 = 1
    assert apportion(5, [0, 0]) == [0, 0]


@given(st.integers(0, 10**15), st.lists(st.integers(0, 10**9), min_size=1, max_size=6))
def test_pro_rata_floor_never_pays_more_than_the_pool(pool, shares):
    paid = pro_rata_floor(pool, shares)
    assert sum(paid) <= pool
    if any(shares):
        assert pool - sum(paid) < len(shares)  # at most one unit of rounding per recipient
        assert all(part == pool * share // sum(shares) for part, share in zip(paid, shares, strict=True))
    else:
        assert paid == [0] * len(shares)


def test_weight_rows_scale_to_u16_and_ignore_negatives_and_nan():
    assert to_u16_row(torch.tensor([0.5, 1.0, -3.0, float("nan")])) == [32768, WEIGHT_MAX, 0, 0]
    assert to_u16_row(torch.tensor([-1.0, 0.0])) == [0, 0]
    assert to_u16_row(torch.zeros(0)) == []


def test_fractions_are_stored_in_units_of_a_billionth():
    assert FIXED_ONE == 10**9
    assert to_fixed(torch.tensor([0.25, 1 / 3, 1.0], dtype=torch.float64)) == [
        250_000_000,
        333_333_333,
        FIXED_ONE,
    ]
