"""What PoI writes back into routing: a selection-only bias per expert made of clipped quality feedback,
minus a load price that keeps every expert's load under a bound, and a large negative bias for banned
experts (consecutive failures, with exponential back-off).

Legend: E experts.
"""

from __future__ import annotations

import torch

BAN_BIAS = -1.0e4  # selection bias of a banned expert: never in any token's top-k, yet finite (no NaN)


def quality_bias(score_E: torch.Tensor, load_E: torch.Tensor, strength: float, clip: float) -> torch.Tensor:
    """Per-token quality (score / traffic share), centred and in units of its mean magnitude, times
    `strength`, clipped to ±clip.

    Per token, because routing decides per token: a rarely used honest expert has a small total
    score but is as good per token, and must not be starved for it (totals would make the rich
    richer). Scale-free, so one strength means the same early and late in training.
    """
    quality_E = score_E / load_E.clamp_min(0.1 / load_E.numel())
    scale = float(quality_E.abs().mean())
    if strength == 0 or scale == 0:
        return torch.zeros_like(score_E)
    return (strength * (quality_E - quality_E.mean()) / scale).clamp(-clip, clip)


def raise_load_price(
    price_E: torch.Tensor, load_ratio_E: torch.Tensor, rate: float, bound: float
) -> torch.Tensor:
    """A price per expert on the constraint load/mean ≤ bound: it rises by `rate` each step the expert
    is over the bound and falls by `rate` each step it is under, never below zero, so quality feedback
    cannot pile tokens onto a few experts. Steps of fixed size (as in loss-free balancing, Wang et al.
    2024) catch up with a large quality bias in a few dozen steps whatever the size of the excess;
    the load then hovers at the bound, above it in about half the steps."""
    return (price_E + rate * torch.sign(load_ratio_E - bound)).clamp_min(0.0)


def ban_lengths(bans_E: torch.Tensor, first: int, longest: int) -> torch.Tensor:
    """Steps of each expert's next ban [E]: `first`, doubled for every earlier ban, at most `longest`."""
    return (first * 2 ** bans_E.clamp_max(30)).clamp_max(longest)


def selection_bias(
    score_E: torch.Tensor,
    load_E: torch.Tensor,
    load_price_E: torch.Tensor,
    banned_E: torch.Tensor,
    strength: float,
    clip: float,
) -> torch.Tensor:
    """The bias on router selection [E]: quality − load price (with feedback on), BAN_BIAS where banned."""
    bias_E = torch.zeros_like(score_E)
    if strength > 0:
        bias_E = quality_bias(score_E, load_E, strength, clip) - load_price_E
    return torch.where(banned_E, BAN_BIAS, bias_E)
