"""What PoI writes back into routing: a selection-only bias per expert made of clipped quality feedback,
minus a load price that keeps every expert's load under a bound, and a large negative bias for banned
experts (consecutive failures, with exponential back-off). Also the market's terms (`market_bias`):
expected latency and price, which the engine sets as the layer's "market" bias term beside PoI's.

Legend: E experts.
"""

from __future__ import annotations

import torch

from moe.errors import ConfigError

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


def relative_excess(value_E: torch.Tensor) -> torch.Tensor:
    """value_e / mean − 1 over the experts with a known (finite) value, 0 for the others [E]; all 0 when
    none is known or their mean is 0. Scale-free: seconds or milliseconds, cheap or dear tokens alike."""
    value_E = value_E.double()
    known_E = torch.isfinite(value_E)
    mean = value_E[known_E].mean() if bool(known_E.any()) else value_E.new_zeros(())
    if float(mean) == 0.0:
        return torch.zeros_like(value_E)
    return torch.where(known_E, value_E / mean - 1.0, 0.0)


def market_bias(
    reply_time_E: torch.Tensor,
    price_E: torch.Tensor | None,
    latency_weight: float,
    price_weight: float,
) -> torch.Tensor:
    """The market's selection bias [E] (float32): −latency_weight · (t_e / mean t − 1) − price_weight ·
    (p_e / mean p − 1), with t an expert's expected reply time (`pool.reply_time_E`; an expert not yet
    measured, NaN, gets no latency term and is left out of the mean) and p its price (tokens per 1,000
    tokens processed; None: no price term).

    An expert twice as slow as the average loses `latency_weight` logits of selection key, one at half
    the average price gains `price_weight / 2`; each term averages zero over the experts it knows, so
    the market shifts traffic without moving every logit. Zero weights give exactly zero (routing as
    without a market)."""
    if latency_weight < 0 or price_weight < 0:
        raise ConfigError(
            f"market.latency_weight={latency_weight} and market.price_weight={price_weight} must be >= 0"
        )
    if price_E is not None and price_E.shape != reply_time_E.shape:
        raise ConfigError(f"price_E of shape {tuple(price_E.shape)} for {reply_time_E.numel()} experts")
    bias_E = torch.zeros(reply_time_E.shape, dtype=torch.float64)
    if latency_weight > 0:
        bias_E -= latency_weight * relative_excess(reply_time_E.cpu())
    if price_weight > 0 and price_E is not None:
        bias_E -= price_weight * relative_excess(price_E.cpu())
    return bias_E.float()
