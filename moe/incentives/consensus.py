"""Yuma consensus: turn validators' weight rows and stakes into miner incentive and validator dividends.

A pure function on tensors with the semantics of Bittensor's subtensor chain (``epoch.rs``): a
stake-weighted κ-median per miner decides what the majority supports, weights above it are clipped, and
bonds (an exponential moving average of what each validator backed) decide who earns the dividends.

Shape legend: V = validators, M = miners. ``weights_VM[i, j]`` is validator i's weight on miner j.
Tensors in, tensors out; inside, the arithmetic is float64 numpy on the CPU: deterministic, exact at
ties of κ for stakes that are simple fractions, and single-threaded, so an epoch costs the same whether
or not the trainer's threads are busy (torch's intra-op threads slow it down several times then).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Float slack when comparing accumulated stake with κ; far below any meaningful stake difference.
KAPPA_TOLERANCE = 1e-12

# Liquid alpha defaults (alpha_low, alpha_high, sigmoid steepness), as in the Yuma 3 reference simulation.
DEFAULT_LIQUID_ALPHA = (0.1, 0.3, 10.0)


@dataclass(frozen=True)
class YumaResult:
    """What one Yuma epoch decides; all tensors are float64 on the CPU.

    Validator-indexed tensors have length V, miner-indexed ones length M.
    """

    weights: torch.Tensor  # [V, M] rows normalised to sum 1 (all-zero rows stay zero)
    stake: torch.Tensor  # [V] normalised to sum 1 (all zero if the total stake is zero)
    consensus: torch.Tensor  # [M] stake-weighted κ-median of each miner's column
    clipped_weights: torch.Tensor  # [V, M] weights clipped to consensus
    ranks: torch.Tensor  # [M] stake-weighted sum of clipped weights
    trust: torch.Tensor  # [M] rank / prerank: the share of a miner's support that survived clipping
    incentive: torch.Tensor  # [M] ranks normalised to sum 1 (zero if no rank at all)
    validator_trust: torch.Tensor  # [V] row sums of clipped weights
    bonds: torch.Tensor  # [V, M] this epoch's bonds (pass as prev_bonds next epoch)
    dividends: torch.Tensor  # [V] normalised to sum 1 (zero if no validator earned any)


def yuma_epoch(
    weights: torch.Tensor,
    stake: torch.Tensor,
    prev_bonds: torch.Tensor | None = None,
    *,
    kappa: float = 0.5,
    bond_alpha: float = 0.1,
    bonds_penalty: float = 1.0,
    yuma3: bool = False,
    liquid_alpha: bool | Sequence[float] | None = None,
) -> YumaResult:
    """Run one Yuma consensus epoch.

    Args:
        weights: ``[V, M]`` non-negative weights, any scale per row.
        stake: ``[V]`` non-negative stakes, any scale.
        prev_bonds: ``[V, M]`` bonds returned by the previous epoch, or None for none yet (zeros).
        kappa: majority fraction of stake that must support a weight for it to count (κ ∈ [0, 1]).
        bond_alpha: EMA rate α of the bonds (the weight given to this epoch), α ∈ [0, 1].
        bonds_penalty: β ∈ [0, 1]; how much the clipped weights, rather than the raw weights, buy bonds.
        yuma3: per-pair bonds in [0, 1] that do not depend on stake (Yuma 3) instead of Yuma 2 bonds.
        liquid_alpha: Yuma 3 only. None/False: fixed ``bond_alpha``. True: per-pair α with the defaults
            ``(alpha_low, alpha_high, steepness) = (0.1, 0.3, 10)``; or a sequence ``(low, high)`` or
            ``(low, high, steepness)``.

    Steps (S = normalised stake, W = row-normalised weights):
        1. ``W_ij = w_ij / Σ_k w_ik`` (zero rows stay zero); ``S_i = s_i / Σ_k s_k``.
        2. Consensus ``C_j = max{ v ∈ {W_ij : S_i > 0} : Σ_{i: W_ij ≥ v} S_i ≥ κ }`` — the largest weight
           that validators holding at least κ of the stake support (ties at exactly κ count as support);
           0 when the total stake is 0.
        3. Clipped weights ``W̄_ij = min(W_ij, C_j)``.
        4. Prerank ``P_j = Σ_i S_i·W_ij``; ranks ``R_j = Σ_i S_i·W̄_ij``; trust ``T_j = R_j / P_j``;
           incentive ``I_j = R_j / Σ_k R_k``; validator trust ``VT_i = Σ_j W̄_ij``.
        5. Bond weights ``W̃ = (1 − β)·W + β·W̄``.
        6. Yuma 2 bonds: ``ΔB_ij = S_i·W̃_ij / Σ_k S_k·W̃_kj``; ``B_prev`` column-normalised;
           ``B = colnorm(α·ΔB + (1 − α)·B_prev)``; dividends ``D_i = Σ_j B_ij·I_j / Σ_k Σ_j B_kj·I_j``.
        6'. Yuma 3 bonds: ``B_ij = min(1, (1 − α_ij)·B_prev_ij + α_ij·W̃_ij)`` with α_ij = bond_alpha, or
           with liquid alpha ``α_ij = low + (high − low)·σ(steepness·(d_ij − ½))`` where
           ``d_ij = clamp(W̃_ij − C_j, 0, 1)`` if ``W̃_ij ≥ B_prev_ij`` (buying) else
           ``clamp(B_prev_ij − W̃_ij, 0, 1)`` (selling); liquid alpha applies only when some C_j > 0.
           Dividends ``D_i ∝ S_i·Σ_j colnorm(B)_ij·I_j``.
        Every normalisation of an all-zero vector or column leaves zeros, so no step yields NaN.
    """
    weights_VM, stake_V, prev_bonds_VM = _validated(
        weights, stake, prev_bonds, kappa, bond_alpha, bonds_penalty
    )
    if liquid_alpha and not yuma3:
        raise ValueError("liquid_alpha is implemented for yuma3 only; set yuma3=True or liquid_alpha=None")
    weights_VM = _normalise_rows(weights_VM)
    stake_V = _normalise(stake_V)

    consensus_M = _stake_weighted_median(weights_VM, stake_V, kappa)
    clipped_VM = np.minimum(weights_VM, consensus_M)
    # einsum, not BLAS: numpy's threaded gemv is an order of magnitude slower here on a busy machine.
    prerank_M = np.einsum("v,vm->m", stake_V, weights_VM)
    ranks_M = np.einsum("v,vm->m", stake_V, clipped_VM)
    trust_M = _divide_or_zero(ranks_M, prerank_M)
    incentive_M = _normalise(ranks_M)
    validator_trust_V = clipped_VM.sum(axis=1)

    bond_weights_VM = (
        clipped_VM
        if bonds_penalty == 1.0
        else (1.0 - bonds_penalty) * weights_VM + bonds_penalty * clipped_VM
    )
    if yuma3:
        alpha = _yuma3_alpha(bond_weights_VM, prev_bonds_VM, consensus_M, bond_alpha, liquid_alpha)
        bonds_VM = np.clip((1.0 - alpha) * prev_bonds_VM + alpha * bond_weights_VM, 0.0, 1.0)
        dividends_V = _normalise(stake_V * np.einsum("vm,m->v", _normalise_columns(bonds_VM), incentive_M))
    else:
        bonds_delta_VM = _normalise_columns(stake_V[:, None] * bond_weights_VM)
        ema_VM = bond_alpha * bonds_delta_VM + (1.0 - bond_alpha) * _normalise_columns(prev_bonds_VM)
        bonds_VM = _normalise_columns(ema_VM)
        dividends_V = _normalise(np.einsum("vm,m->v", bonds_VM, incentive_M))

    return YumaResult(
        weights=torch.from_numpy(weights_VM),
        stake=torch.from_numpy(stake_V),
        consensus=torch.from_numpy(consensus_M),
        clipped_weights=torch.from_numpy(clipped_VM),
        ranks=torch.from_numpy(ranks_M),
        trust=torch.from_numpy(trust_M),
        incentive=torch.from_numpy(incentive_M),
        validator_trust=torch.from_numpy(validator_trust_V),
        bonds=torch.from_numpy(bonds_VM),
        dividends=torch.from_numpy(dividends_V),
    )


def _stake_weighted_median(weights_VM: np.ndarray, stake_V: np.ndarray, kappa: float) -> np.ndarray:
    """Sort-based κ-median of each column (``stake_V`` normalised, zero-stake validators never decide).

    Sort each column in descending order, accumulate the stake along it, and take the value where the
    accumulated stake first reaches κ. At that position every larger value has support below κ, and the
    value itself has at least κ (its equal-valued neighbours only add more), which is exactly subtensor's
    weighted median with ties at κ counting as support; the order among equal values does not matter.
    """
    num_validators, num_miners = weights_VM.shape
    if num_validators == 0 or num_miners == 0 or stake_V.sum() <= 0.0:
        return np.zeros(num_miners)
    # Negated so an ascending sort gives descending weights; zero-stake validators sink below every weight.
    keys_MV = np.negative(weights_VM.T, order="C")
    keys_MV[:, stake_V <= 0] = 1.0
    order_MV = np.argsort(keys_MV, axis=1)
    support_MV = np.cumsum(stake_V[order_MV], axis=1)
    first_M = np.argmax(support_MV >= kappa - KAPPA_TOLERANCE, axis=1)
    rows_M = np.arange(num_miners)
    return np.maximum(-keys_MV[rows_M, order_MV[rows_M, first_M]], 0.0)


def _yuma3_alpha(
    bond_weights_VM: np.ndarray,
    prev_bonds_VM: np.ndarray,
    consensus_M: np.ndarray,
    bond_alpha: float,
    liquid_alpha: bool | Sequence[float] | None,
) -> np.ndarray | float:
    """The bond EMA rate: ``bond_alpha`` or, with liquid alpha, a per-pair rate (see ``yuma_epoch``)."""
    if not liquid_alpha or not (consensus_M > 0).any():
        return bond_alpha
    alpha_low, alpha_high, steepness = _liquid_alpha_params(liquid_alpha)
    buying_VM = bond_weights_VM >= prev_bonds_VM
    diff_buy_VM = np.clip(bond_weights_VM - consensus_M, 0.0, 1.0)
    diff_sell_VM = np.clip(prev_bonds_VM - bond_weights_VM, 0.0, 1.0)
    diff_VM = np.where(buying_VM, diff_buy_VM, diff_sell_VM)
    sigmoid_VM = 1.0 / (1.0 + np.exp(-steepness * (diff_VM - 0.5)))
    return np.clip(alpha_low + sigmoid_VM * (alpha_high - alpha_low), alpha_low, alpha_high)


def _liquid_alpha_params(liquid_alpha: bool | Sequence[float]) -> tuple[float, float, float]:
    if liquid_alpha is True:
        return DEFAULT_LIQUID_ALPHA
    values = [float(v) for v in liquid_alpha]
    if len(values) == 2:
        values.append(DEFAULT_LIQUID_ALPHA[2])
    if len(values) != 3:
        raise ValueError(f"liquid_alpha must be (alpha_low, alpha_high[, steepness]), got {liquid_alpha!r}")
    alpha_low, alpha_high, steepness = values
    if not 0.0 <= alpha_low <= alpha_high <= 1.0:
        raise ValueError(f"liquid_alpha needs 0 <= alpha_low <= alpha_high <= 1, got {liquid_alpha!r}")
    return alpha_low, alpha_high, steepness


def _validated(
    weights: torch.Tensor,
    stake: torch.Tensor,
    prev_bonds: torch.Tensor | None,
    kappa: float,
    bond_alpha: float,
    bonds_penalty: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check shapes, ranges and finiteness; return float64 arrays (zeros for missing bonds)."""
    weights_VM = _as_float64_array(weights)
    stake_V = _as_float64_array(stake)
    if weights_VM.ndim != 2:
        raise ValueError(f"weights must be [validators, miners], got shape {weights_VM.shape}")
    if stake_V.shape != (weights_VM.shape[0],):
        raise ValueError(f"stake must have shape ({weights_VM.shape[0]},), got {stake_V.shape}")
    for name, value in (("kappa", kappa), ("bond_alpha", bond_alpha), ("bonds_penalty", bonds_penalty)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    _require_finite_non_negative("weights", weights_VM)
    _require_finite_non_negative("stake", stake_V)
    if prev_bonds is None:
        return weights_VM, stake_V, np.zeros_like(weights_VM)
    prev_bonds_VM = _as_float64_array(prev_bonds)
    if prev_bonds_VM.shape != weights_VM.shape:
        raise ValueError(f"prev_bonds must match weights {weights_VM.shape}, got {prev_bonds_VM.shape}")
    _require_finite_non_negative("prev_bonds", prev_bonds_VM)
    return weights_VM, stake_V, prev_bonds_VM


def _as_float64_array(values: torch.Tensor | Sequence[float]) -> np.ndarray:
    return torch.as_tensor(values).detach().to("cpu", torch.float64).numpy()


def _require_finite_non_negative(name: str, values: np.ndarray) -> None:
    if values.size == 0:
        return
    smallest = float(values.min())
    if math.isnan(smallest) or smallest < 0:
        raise ValueError(f"{name} must be non-negative and not NaN (smallest entry {smallest})")
    if not math.isfinite(float(values.max())):
        raise ValueError(f"{name} contains infinity")


def _divide_or_zero(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise ``numerator / denominator`` (broadcasting), 0 where the denominator is 0."""
    shape = np.broadcast_shapes(numerator.shape, denominator.shape)
    return np.divide(numerator, denominator, out=np.zeros(shape), where=denominator > 0)


def _normalise(values: np.ndarray) -> np.ndarray:
    """Scale to sum 1; an all-zero vector stays zero."""
    total = values.sum()
    return values / total if total > 0.0 else np.zeros_like(values)


def _normalise_rows(values_VM: np.ndarray) -> np.ndarray:
    return _divide_or_zero(values_VM, values_VM.sum(axis=1, keepdims=True))


def _normalise_columns(values_VM: np.ndarray) -> np.ndarray:
    return _divide_or_zero(values_VM, values_VM.sum(axis=0, keepdims=True))
