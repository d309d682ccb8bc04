"""How well a scorer ranks experts: Spearman ρ and Kendall τ of every scorer against exact Shapley values
(all 2^E coalitions; Monte-Carlo with many permutations where E is too large), with the forward passes
each used, and the rank helpers the scorer's metrics use.

Legend: E experts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from moe.incentives.poi.config import (
    ExactShapleyConfig,
    GateConfig,
    LooConfig,
    PoIConfig,
    ShapleyConfig,
    TaylorConfig,
    TokenShapleyConfig,
)
from moe.incentives.poi.shapley import MAX_EXACT_EXPERTS
from moe.incentives.poi.views import masked_views, views_on_batch

MONTE_CARLO_BUDGETS = (2, 8, 32)  # permutations of the Monte-Carlo rivals


def rival_scorers() -> dict[str, PoIConfig]:
    """Every scorer measured against the reference, by the label its metrics carry."""
    return {
        "taylor": TaylorConfig(),
        "taylor_first": TaylorConfig(curvature=False),
        "loo": LooConfig(),
        "gate": GateConfig(),
        **{f"mc{samples}": ShapleyConfig(samples=samples) for samples in MONTE_CARLO_BUDGETS},
        "token_shapley": TokenShapleyConfig(),
    }


@contextmanager
def counted_forwards(model) -> Iterator[list[int]]:
    """Counts the model's forward passes inside (the one-element list holds the count)."""
    count = [0]
    handle = model.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        yield count
    finally:
        handle.remove()


def fidelity(model, batch, samples: int, generator: torch.Generator) -> dict[str, float]:
    """Every rival scorer against exact Shapley values on `batch` (a `samples`-permutation Monte-Carlo
    estimate where a layer has more than MAX_EXACT_EXPERTS experts), per layer:
    `poi/fidelity/<layer>/<scorer>` (Spearman ρ), `poi/fidelity_kendall/<layer>/<scorer>` (Kendall τ), and
    `poi/fidelity_forwards/<scorer>` (forward passes of one view over all layers; `reference` for the
    reference's)."""
    exact = max(layer.pool.num_experts for layer in model.moe_layers()) <= MAX_EXACT_EXPERTS
    with counted_forwards(model) as forwards:
        reference = masked_views(
            ExactShapleyConfig() if exact else ShapleyConfig(samples=samples), model, batch, generator
        )
    results = {"poi/fidelity_forwards/reference": float(forwards[0])}
    for scorer, cfg in rival_scorers().items():
        with counted_forwards(model) as forwards:
            views = views_on_batch(cfg, model, batch, generator)
        results[f"poi/fidelity_forwards/{scorer}"] = float(forwards[0])
        for layer, view in views.items():
            truth_E = reference[layer].contribution_E
            results[f"poi/fidelity/{layer}/{scorer}"] = spearman(view.contribution_E, truth_E)
            results[f"poi/fidelity_kendall/{layer}/{scorer}"] = kendall(view.contribution_E, truth_E)
    return results


def average_ranks(x_E: torch.Tensor) -> torch.Tensor:
    """Ranks 1..E of the values in ascending order, ties sharing their average rank."""
    values = x_E.double().tolist()
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return torch.tensor(ranks, dtype=torch.float64)


def spearman(a_E: torch.Tensor, b_E: torch.Tensor) -> float:
    """Spearman rank correlation (ties averaged); NaN when either side is constant."""
    ra, rb = average_ranks(a_E), average_ranks(b_E)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator > 0 else float("nan")


def kendall(a_E: torch.Tensor, b_E: torch.Tensor) -> float:
    """Kendall's τ-b (ties on either side count as neither concordant nor discordant); NaN when either
    side is constant."""
    a, b = a_E.double().tolist(), b_E.double().tolist()
    concordant = discordant = tied_a = tied_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            sign = (a[i] > a[j]) - (a[i] < a[j]), (b[i] > b[j]) - (b[i] < b[j])
            tied_a += sign[0] == 0
            tied_b += sign[1] == 0
            concordant += sign[0] * sign[1] > 0
            discordant += sign[0] * sign[1] < 0
    pairs = len(a) * (len(a) - 1) // 2
    denominator = ((pairs - tied_a) * (pairs - tied_b)) ** 0.5
    return (concordant - discordant) / denominator if denominator > 0 else float("nan")


def score_ranks(score_E: torch.Tensor) -> torch.Tensor:
    """Rank of each expert [E], 1 = highest score; ties go to the lower index."""
    order_E = torch.sort(-score_E.double(), stable=True).indices
    return torch.empty_like(order_E).scatter_(0, order_E, torch.arange(1, score_E.numel() + 1))
