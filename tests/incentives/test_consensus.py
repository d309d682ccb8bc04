"""Yuma consensus: hand-computed cases, a plain-loop reference on random inputs, and κ-clipping.

Shape legend: V = validators, M = miners.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe.incentives.consensus import DEFAULT_LIQUID_ALPHA, yuma_epoch

FIELDS = ("weights", "stake", "consensus", "clipped_weights", "ranks", "trust", "incentive", "validator_trust",
          "bonds", "dividends")  # fmt: skip


def _tensor(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _assert_close(actual: torch.Tensor, expected: list | torch.Tensor, atol: float = 1e-12) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Hand-computed cases


def test_two_validators_two_miners_by_hand():
    # S = [3/4, 1/4]; W = [[1/2, 1/2], [1/4, 3/4]]; both consensus values are 1/2 (the big validator's weight).
    result = yuma_epoch(_tensor([[1, 1], [1, 3]]), _tensor([3, 1]))
    _assert_close(result.stake, [0.75, 0.25])
    _assert_close(result.consensus, [0.5, 0.5])
    _assert_close(result.clipped_weights, [[0.5, 0.5], [0.25, 0.5]])
    # R = [3/4·1/2 + 1/4·1/4, 3/4·1/2 + 1/4·1/2] = [7/16, 1/2]; ΣR = 15/16.
    _assert_close(result.ranks, [7 / 16, 1 / 2])
    _assert_close(result.incentive, [7 / 15, 8 / 15])
    _assert_close(result.trust, [1.0, (1 / 2) / (9 / 16)])
    _assert_close(result.validator_trust, [1.0, 0.75])
    # ΔB = S·W̄ column-normalised = [[6/7, 3/4], [1/7, 1/4]]; with no previous bonds B = ΔB.
    _assert_close(result.bonds, [[6 / 7, 3 / 4], [1 / 7, 1 / 4]])
    # D = B·I = [6/7·7/15 + 3/4·8/15, 1/7·7/15 + 1/4·8/15] = [4/5, 1/5].
    _assert_close(result.dividends, [0.8, 0.2])


def test_tie_at_exactly_kappa_counts_as_support():
    # Each validator holds exactly half the stake and backs a different miner fully.
    result = yuma_epoch(_tensor([[1, 0], [0, 1]]), _tensor([1, 1]), kappa=0.5)
    _assert_close(result.consensus, [1.0, 1.0])
    _assert_close(result.incentive, [0.5, 0.5])


def test_tie_at_kappa_with_three_validators_and_just_below():
    weights = _tensor([[4, 1], [4, 1], [1, 4]])  # miner 0 gets 0.8, 0.8, 0.2
    exactly_half = yuma_epoch(weights, _tensor([1, 1, 2]), kappa=0.5)
    assert exactly_half.consensus[0].item() == pytest.approx(0.8)
    just_below = yuma_epoch(weights, _tensor([1, 1, 2.001]), kappa=0.5)
    assert just_below.consensus[0].item() == pytest.approx(0.2)


def test_zero_stake_validator_changes_nothing_and_earns_nothing():
    base = yuma_epoch(_tensor([[1, 1], [1, 3]]), _tensor([3, 1]))
    with_idle = yuma_epoch(_tensor([[1, 1], [1, 3], [0, 1]]), _tensor([3, 1, 0]))
    _assert_close(with_idle.consensus, base.consensus)
    _assert_close(with_idle.incentive, base.incentive)
    _assert_close(with_idle.dividends, [*base.dividends.tolist(), 0.0])
    _assert_close(with_idle.validator_trust[2], 0.5)  # its clipped row still exists: min(1, 1/2)


def test_zero_stake_validator_never_becomes_the_consensus_even_at_kappa_zero():
    result = yuma_epoch(_tensor([[1, 1], [1, 3], [0, 1]]), _tensor([3, 1, 0]), kappa=0.0)
    _assert_close(result.consensus, [0.5, 0.75])  # the largest weight among staked validators


def test_empty_column_and_all_zero_row_give_zeros_not_nan():
    weights = _tensor([[1, 1, 0], [0, 0, 0], [1, 3, 0]])
    result = yuma_epoch(weights, _tensor([3, 5, 1]), prev_bonds=torch.zeros(3, 3))
    for name in FIELDS:
        assert torch.isfinite(getattr(result, name)).all(), name
    _assert_close(result.consensus[2], 0.0)
    _assert_close(result.incentive[2], 0.0)
    _assert_close(result.bonds[:, 2], [0.0, 0.0, 0.0])
    _assert_close(result.weights[1], [0.0, 0.0, 0.0])
    _assert_close(result.dividends[1], 0.0)
    # The silent validator holds most stake, and its zeros count: consensus is 0 everywhere.
    _assert_close(result.consensus, [0.0, 0.0, 0.0])


@pytest.mark.parametrize("yuma3", [False, True])
def test_degenerate_inputs_stay_finite(yuma3):
    cases = [
        (torch.zeros(3, 4), torch.zeros(3)),  # no stake at all
        (torch.zeros(3, 4), torch.ones(3)),  # no weights at all
        (torch.zeros(0, 4), torch.zeros(0)),  # no validators
        (torch.zeros(3, 0), torch.ones(3)),  # no miners
    ]
    for weights, stake in cases:
        result = yuma_epoch(weights, stake, yuma3=yuma3)
        for name in FIELDS:
            assert torch.isfinite(getattr(result, name)).all(), (name, tuple(weights.shape))
        assert float(result.incentive.sum()) == 0.0
        assert float(result.dividends.sum()) == 0.0


def test_bonds_follow_the_ema_across_epochs():
    stake = _tensor([1, 3])
    first = yuma_epoch(_tensor([[1, 1], [1, 1]]), stake, bond_alpha=0.1)
    second_weights = _tensor([[1, 1], [1, 3]])
    second = yuma_epoch(second_weights, stake, first.bonds, bond_alpha=0.1)
    # With no previous bonds B = ΔB, so a fresh epoch on the second weights yields its ΔB.
    bonds_delta = yuma_epoch(second_weights, stake).bonds
    _assert_close(bonds_delta, [[0.25, 0.125 / 0.6875], [0.75, 0.5625 / 0.6875]])
    # 0.1·ΔB + 0.9·B_prev; both are column-normalised already, so the final normalisation keeps it.
    _assert_close(second.bonds, 0.1 * bonds_delta + 0.9 * first.bonds)


def test_invalid_inputs_are_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        yuma_epoch(_tensor([[1, -1]]), _tensor([1]))
    with pytest.raises(ValueError, match="NaN"):
        yuma_epoch(_tensor([[1, math.nan]]), _tensor([1]))
    with pytest.raises(ValueError, match="stake must have shape"):
        yuma_epoch(_tensor([[1, 1]]), _tensor([1, 1]))
    with pytest.raises(ValueError, match="kappa"):
        yuma_epoch(_tensor([[1, 1]]), _tensor([1]), kappa=1.5)
    with pytest.raises(ValueError, match="yuma3"):
        yuma_epoch(_tensor([[1, 1]]), _tensor([1]), liquid_alpha=True)


# ---------------------------------------------------------------------------------------------------------
# A plain-loop reference, straight from the formulas in the docstring


def _normalised(values: list[float]) -> list[float]:
    total = sum(values)
    return [v / total for v in values] if total > 0 else [0.0] * len(values)


def _column_normalised(matrix: list[list[float]], num_miners: int) -> list[list[float]]:
    columns = [_normalised([row[j] for row in matrix]) for j in range(num_miners)]
    return [[columns[j][i] for j in range(num_miners)] for i in range(len(matrix))]


def reference_yuma(weights, stake, prev_bonds, kappa, bond_alpha, bonds_penalty, yuma3, liquid_alpha):
    """Yuma with loops over lists; ``stake`` must hold integers so support sums are exact."""
    num_validators, num_miners = len(weights), len(weights[0])
    W = [_normalised([float(w) for w in row]) for row in weights]
    S = _normalised([float(s) for s in stake])
    total_stake = sum(stake)
    C = []
    for j in range(num_miners):
        best = 0.0
        for i in range(num_validators):
            value = W[i][j]
            support = sum(stake[k] for k in range(num_validators) if W[k][j] >= value)
            if stake[i] > 0 and support >= kappa * total_stake and value > best:
                best = value
        C.append(best)
    clipped = [[min(W[i][j], C[j]) for j in range(num_miners)] for i in range(num_validators)]
    ranks = [sum(S[i] * clipped[i][j] for i in range(num_validators)) for j in range(num_miners)]
    preranks = [sum(S[i] * W[i][j] for i in range(num_validators)) for j in range(num_miners)]
    incentive = _normalised(ranks)
    bond_weights = [
        [(1 - bonds_penalty) * W[i][j] + bonds_penalty * clipped[i][j] for j in range(num_miners)]
        for i in range(num_validators)
    ]
    previous = prev_bonds or [[0.0] * num_miners for _ in range(num_validators)]
    if not yuma3:
        delta = _column_normalised(
            [[S[i] * bond_weights[i][j] for j in range(num_miners)] for i in range(num_validators)],
            num_miners,
        )
        prev_norm = _column_normalised(previous, num_miners)
        ema = [
            [bond_alpha * delta[i][j] + (1 - bond_alpha) * prev_norm[i][j] for j in range(num_miners)]
            for i in range(num_validators)
        ]
        bonds = _column_normalised(ema, num_miners)
        dividends = _normalised(
            [sum(bonds[i][j] * incentive[j] for j in range(num_miners)) for i in range(num_validators)]
        )
    else:
        bonds = []
        for i in range(num_validators):
            row = []
            for j in range(num_miners):
                alpha = bond_alpha
                if liquid_alpha and any(c > 0 for c in C):
                    low, high, steepness = liquid_alpha
                    if bond_weights[i][j] >= previous[i][j]:
                        diff = min(max(bond_weights[i][j] - C[j], 0.0), 1.0)
                    else:
                        diff = min(max(previous[i][j] - bond_weights[i][j], 0.0), 1.0)
                    sigmoid = 1.0 / (1.0 + math.exp(-steepness * (diff - 0.5)))
                    alpha = min(max(low + sigmoid * (high - low), low), high)
                row.append(min(1.0, (1 - alpha) * previous[i][j] + alpha * bond_weights[i][j]))
            bonds.append(row)
        bonds_norm = _column_normalised(bonds, num_miners)
        dividends = _normalised(
            [S[i] * sum(bonds_norm[i][j] * incentive[j] for j in range(num_miners)) for i in range(num_validators)]
        )  # fmt: skip
    return {
        "weights": W,
        "stake": S,
        "consensus": C,
        "clipped_weights": clipped,
        "ranks": ranks,
        "trust": [r / p if p > 0 else 0.0 for r, p in zip(ranks, preranks, strict=True)],
        "incentive": incentive,
        "validator_trust": [sum(row) for row in clipped],
        "bonds": bonds,
        "dividends": dividends,
    }


@st.composite
def yuma_inputs(draw):
    num_validators = draw(st.integers(1, 5))
    num_miners = draw(st.integers(1, 5))
    # Small integer weights and stakes make ties (including ties at exactly κ) common and exact.
    weights = draw(st.lists(st.lists(st.integers(0, 3), min_size=num_miners, max_size=num_miners),
                            min_size=num_validators, max_size=num_validators))  # fmt: skip
    stake = draw(st.lists(st.integers(0, 3), min_size=num_validators, max_size=num_validators))
    prev_bonds = draw(
        st.none()
        | st.lists(st.lists(st.floats(0, 1), min_size=num_miners, max_size=num_miners),
                   min_size=num_validators, max_size=num_validators)
    )  # fmt: skip
    yuma3 = draw(st.booleans())
    return {
        "weights": weights,
        "stake": stake,
        "prev_bonds": prev_bonds,
        "kappa": draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])),
        "bond_alpha": draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        "bonds_penalty": draw(st.sampled_from([0.0, 0.5, 1.0])),
        "yuma3": yuma3,
        "liquid_alpha": draw(st.sampled_from([None, DEFAULT_LIQUID_ALPHA])) if yuma3 else None,
    }


def _compare_with_reference(inputs: dict) -> None:
    expected = reference_yuma(**inputs)
    actual = yuma_epoch(
        _tensor(inputs["weights"]),
        _tensor(inputs["stake"]),
        None if inputs["prev_bonds"] is None else _tensor(inputs["prev_bonds"]),
        kappa=inputs["kappa"],
        bond_alpha=inputs["bond_alpha"],
        bonds_penalty=inputs["bonds_penalty"],
        yuma3=inputs["yuma3"],
        liquid_alpha=inputs["liquid_alpha"],
    )
    for name in FIELDS:
        _assert_close(getattr(actual, name), expected[name], atol=1e-9)


@settings(max_examples=300, deadline=None)
@given(yuma_inputs())
def test_matches_plain_loop_reference(inputs):
    _compare_with_reference(inputs)


@pytest.mark.parametrize("seed", range(5))
def test_matches_reference_on_larger_random_inputs(seed):
    generator = torch.Generator().manual_seed(seed)
    num_validators, num_miners = 9, 13
    weights = torch.randint(0, 6, (num_validators, num_miners), generator=generator)
    weights[0] = 0  # a silent validator
    weights[:, 3] = 0  # an empty column
    stake = torch.randint(0, 5, (num_validators,), generator=generator)
    prev_bonds = torch.rand(num_validators, num_miners, generator=generator, dtype=torch.float64)
    for yuma3 in (False, True):
        _compare_with_reference({
            "weights": weights.tolist(),
            "stake": stake.tolist(),
            "prev_bonds": prev_bonds.tolist(),
            "kappa": 0.5,
            "bond_alpha": 0.1,
            "bonds_penalty": 1.0,
            "yuma3": yuma3,
            "liquid_alpha": DEFAULT_LIQUID_ALPHA if yuma3 else None,
        })  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# κ-clipping against a cabal


def _cabal_epoch(cabal_stake_fraction: float, honest_row_M: torch.Tensor, cabal_miners: list[int]):
    """Three honest validators share (1 − f) of the stake and submit ``honest_row_M``; two cabal validators
    share f and put all their weight on ``cabal_miners``."""
    cabal_row_M = torch.zeros_like(honest_row_M)
    cabal_row_M[cabal_miners] = 1.0
    weights_VM = torch.stack([honest_row_M] * 3 + [cabal_row_M] * 2)
    honest_share = (1.0 - cabal_stake_fraction) / 3
    stake_V = _tensor([honest_share] * 3 + [cabal_stake_fraction / 2] * 2)
    return yuma_epoch(weights_VM, stake_V)


@pytest.mark.parametrize("cabal_stake_fraction", [0.1, 0.3, 0.49])
def test_minority_cabal_cannot_lift_worthless_miners(cabal_stake_fraction):
    honest_row = _tensor([4, 3, 2, 1, 0, 0])  # the cabal's miners 4 and 5 contribute nothing
    result = _cabal_epoch(cabal_stake_fraction, honest_row, [4, 5])
    _assert_close(result.consensus[4:], [0.0, 0.0])
    _assert_close(result.incentive[4:], [0.0, 0.0])
    assert result.validator_trust[3:].max() == 0.0  # the cabal's weight is clipped away entirely


def test_majority_cabal_takes_over():
    result = _cabal_epoch(0.6, _tensor([4, 3, 2, 1, 0, 0]), [4, 5])
    assert float(result.incentive[4:].sum()) > 0.5


@settings(max_examples=100, deadline=None)
@given(
    honest=st.lists(st.integers(0, 5), min_size=6, max_size=6).filter(any),
    cabal_miners=st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True),
    cabal_stake_fraction=st.floats(0.0, 0.49),
)
def test_minority_cabal_gets_at_most_the_honest_consensus(honest, cabal_miners, cabal_stake_fraction):
    honest_row = _tensor(honest)
    honest_weights = honest_row / honest_row.sum()
    result = _cabal_epoch(cabal_stake_fraction, honest_row, cabal_miners)
    honest_only = yuma_epoch(honest_row.unsqueeze(0), _tensor([1.0]))
    _assert_close(result.consensus, honest_weights, atol=1e-12)
    # Each cabal miner's rank is at most what the honest weights give it ...
    assert (result.ranks <= honest_only.ranks + 1e-12).all()
    # ... and its share exceeds the honest share only by the stake the cabal withheld from the others.
    honest_stake = 1.0 - cabal_stake_fraction
    assert (result.incentive[cabal_miners] <= honest_weights[cabal_miners] / honest_stake + 1e-12).all()
