"""Shapley values of a layer's experts in the game v(S) = −L(S), L(S) the loss with only the experts in
S answering: exactly from all 2^E coalitions (the fidelity reference), by Monte-Carlo permutations, and
exactly-per-token (`token_shapley`).

Why per token: with top-k routing a token's output depends only on which of its own k experts answer.
Where nothing after the layer mixes tokens (the last MoE layer of an LM: norm, unembedding and a
per-token loss; any layer of a per-example regression), L(S) = mean_t ℓ_t(S ∩ K_t), so by linearity
the Shapley value of the whole game is the mean over tokens of the Shapley values of k-player games,
and each of those is exact from one antithetic pair of orders when k = 2. Earlier layers feed
attention, which mixes tokens: there the per-token game is an approximation (measured against exact
in `experiment=poi_fidelity`).

Legend: N tokens, E experts, A assignments.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from moe.errors import ConfigError

MAX_EXACT_EXPERTS = (
    12  # 2^12 forwards per layer; beyond that exact Shapley is not a reference anyone waits for
)


def coalition_mask(index: int, num_experts: int) -> torch.Tensor:
    """The coalition whose members are the set bits of `index` [E] (bool)."""
    return torch.tensor([bool(index >> e & 1) for e in range(num_experts)])


def exact_shapley(loss_of: Callable[[torch.Tensor], float], num_experts: int) -> torch.Tensor:
    """Shapley values [E] of v(S) = −L(S) from all 2^E coalitions:
    φ_e = Σ_{S ∌ e} |S|!·(E − |S| − 1)!/E! · (L(S) − L(S ∪ {e}))."""
    if num_experts > MAX_EXACT_EXPERTS:
        raise ConfigError(
            f"exact Shapley over {num_experts} experts needs 2^{num_experts} forwards per layer; "
            f"at most {MAX_EXACT_EXPERTS} experts"
        )
    loss_S = [loss_of(coalition_mask(index, num_experts)) for index in range(2**num_experts)]
    phi_E = torch.zeros(num_experts, dtype=torch.float64)
    for index, loss in enumerate(loss_S):
        size = index.bit_count()
        if size == num_experts:
            continue
        weight = math.factorial(size) * math.factorial(num_experts - size - 1) / math.factorial(num_experts)
        for e in range(num_experts):
            if not index >> e & 1:
                phi_E[e] += weight * (loss - loss_S[index | 1 << e])
    return phi_E.float()


def permutation_shapley(
    loss_of: Callable[[torch.Tensor], float],
    num_experts: int,
    samples: int,
    generator: torch.Generator,
    truncation: float = 0.0,
) -> torch.Tensor:
    """Monte-Carlo permutation Shapley values [E] of the game v(S) = −L(S) (Castro et al. 2009).

    Each permutation adds experts one at a time and credits each with L(before) − L(after); every
    second permutation is the previous one reversed (antithetic pairs halve the variance for
    near-additive games). Without truncation the credits of a permutation telescope to
    L(∅) − L(all), so Σ_e φ_e matches it exactly; with `truncation` > 0 a permutation stops once
    L(S) is within truncation · |L(∅) − L(all)| of L(all) (TMC-Shapley, Ghorbani & Zou 2019).
    """
    everyone_E = torch.ones(num_experts, dtype=torch.bool)
    full, empty = loss_of(everyone_E), loss_of(~everyone_E)
    tolerance = truncation * abs(empty - full)
    phi_E = torch.zeros(num_experts, dtype=torch.float64)
    order = torch.randperm(num_experts, generator=generator)
    for sample in range(samples):
        order = order.flip(0) if sample % 2 else torch.randperm(num_experts, generator=generator)
        keep_E, before = torch.zeros(num_experts, dtype=torch.bool), empty
        for position, e in enumerate(order.tolist()):
            if tolerance > 0 and abs(before - full) <= tolerance:
                break
            keep_E[e] = True
            after = full if position == num_experts - 1 else loss_of(keep_E)
            phi_E[e] += before - after
            before = after
    return (phi_E / samples).float()


def positions_in_token(
    token_idx_A: torch.Tensor, num_tokens: int, generator: torch.Generator
) -> torch.Tensor:
    """A uniformly random order of every token's assignments: each assignment's position [A] in it."""
    priority_A = torch.rand(token_idx_A.shape, generator=generator, dtype=torch.float64)
    order_A = torch.argsort(token_idx_A.double() * 2.0 + priority_A)  # by token, then by priority
    sizes_N = torch.bincount(token_idx_A, minlength=num_tokens)
    starts_N = torch.cumsum(sizes_N, 0) - sizes_N
    position_A = torch.empty_like(token_idx_A)
    position_A[order_A] = torch.arange(token_idx_A.numel()) - starts_N[token_idx_A[order_A]]
    return position_A


def token_shapley(
    token_losses_of: Callable[[torch.Tensor], torch.Tensor],
    token_idx_A: torch.Tensor,
    expert_idx_A: torch.Tensor,
    num_tokens: int,
    num_experts: int,
    permutations: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Per-token permutation Shapley values, averaged over tokens and summed per expert [E].

    `token_losses_of(keep_A)` is the loss of every token [N] with only the assignments in `keep_A`
    answering. Every permutation orders each token's assignments (every second one reverses the
    previous order) and credits each assignment with its token's loss before it joined minus after:
    all tokens advance together, so a permutation costs max_t k_t − 1 passes beyond the shared empty
    and full ones.
    """
    token_idx_A, expert_idx_A = token_idx_A.cpu(), expert_idx_A.cpu()
    if token_idx_A.numel() == 0:
        return torch.zeros(num_experts)
    sizes_A = torch.bincount(token_idx_A, minlength=num_tokens)[token_idx_A]
    nobody_A = torch.zeros_like(token_idx_A, dtype=torch.bool)
    empty_N, full_N = token_losses_of(nobody_A).double().cpu(), token_losses_of(~nobody_A).double().cpu()
    credit_A = torch.zeros(token_idx_A.shape, dtype=torch.float64)
    position_A = positions_in_token(token_idx_A, num_tokens, generator)
    for sample in range(permutations):
        if sample % 2:
            position_A = sizes_A - 1 - position_A
        elif sample:
            position_A = positions_in_token(token_idx_A, num_tokens, generator)
        before_N = empty_N
        for joined in range(1, int(sizes_A.max()) + 1):
            after_N = (
                full_N
                if joined == int(sizes_A.max())
                else token_losses_of(position_A < joined).double().cpu()
            )
            joins_A = position_A == joined - 1
            credit_A[joins_A] += (before_N - after_N)[token_idx_A[joins_A]]
            before_N = after_N
    phi_E = torch.zeros(num_experts, dtype=torch.float64).index_add_(0, expert_idx_A, credit_A)
    return (phi_E / (permutations * num_tokens)).float()
