"""How well a scorer ranks experts: Spearman ρ of taylor, loo and gate against a Monte-Carlo Shapley
reference, and the rank helpers the scorer's metrics use.

Legend: E experts.
"""

from __future__ import annotations

import torch

from moe.incentives.poi.config import GateConfig, LooConfig, ShapleyConfig, TaylorConfig
from moe.incentives.poi.views import masked_views, views_on_batch


def fidelity(model, batch, samples: int, generator: torch.Generator) -> dict[str, float]:
    """Spearman ρ of taylor, loo and gate against a `samples`-permutation Shapley estimate, per layer,
    all on `batch`: `poi/fidelity/<layer>/<scorer>`."""
    reference = masked_views(ShapleyConfig(samples=samples), model, batch, generator)
    rivals = {"taylor": TaylorConfig(), "loo": LooConfig(), "gate": GateConfig()}
    results = {}
    for scorer, cfg in rivals.items():
        for layer, view in views_on_batch(cfg, model, batch, generator).items():
            results[f"poi/fidelity/{layer}/{scorer}"] = spearman(view.contribution_E, reference[layer].contribution_E)
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


def score_ranks(score_E: torch.Tensor) -> torch.Tensor:
    """Rank of each expert [E], 1 = highest score; ties go to the lower index."""
    order_E = torch.sort(-score_E.double(), stable=True).indices
    return torch.empty_like(order_E).scatter_(0, order_E, torch.arange(1, score_E.numel() + 1))
