"""Routing that sees time and cost: after every step, each MoE layer's "market" selection-bias term
from its pool's measured reply times (`pool.reply_time_E`) and its experts' prices.

The `market` config group (a compute marketplace; `market: null` = none) carries four routing fields,
read here by name whatever the rest of its schema holds: `latency_weight` and `price_weight` (the
terms' weights, `moe.incentives.poi.feedback.market_bias`; 0 = today's routing), `latency_ema` and
`straggler_quantile` (how pools measure reply times and cut stragglers; they override the transport's
`FaultPolicy` fields of the same names, a null quantile leaving the transport's own).

Legend: E experts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

import torch
from omegaconf import OmegaConf

from moe.incentives.poi.feedback import market_bias
from moe.nn.layer import MoELayer
from router.typed_config import plain, typed_config

# where each layer's prices come from: a function of the layer's name (the lease book's `price_E`), one
# tensor [E] for every layer, or None (no price term)
Prices = Callable[[str], torch.Tensor] | torch.Tensor | None


@dataclass
class MarketRouting:
    """The routing fields of the `market` config group (see the module docstring)."""

    latency_weight: float = 0.0
    price_weight: float = 0.0
    latency_ema: float = 0.9
    straggler_quantile: float | None = None


def market_routing(market_cfg) -> MarketRouting | None:
    """The routing fields of `cfg.market` (None when there is no market)."""
    if market_cfg is None:
        return None
    names = {f.name for f in fields(MarketRouting)}
    chosen = {key: value for key, value in plain(market_cfg).items() if key in names}
    return typed_config(MarketRouting, chosen, "market")


def with_market_policy(transport_cfg, routing: MarketRouting | None):
    """The transport config with the market's measuring rule (`latency_ema`, `straggler_quantile`)."""
    if routing is None:
        return transport_cfg
    policy = {"latency_ema": routing.latency_ema}
    if routing.straggler_quantile is not None:
        policy["straggler_quantile"] = routing.straggler_quantile
    return OmegaConf.merge(transport_cfg, policy)


def prices_of(prices: Prices, layer: str) -> torch.Tensor | None:
    return prices(layer) if callable(prices) else prices


def apply_market_bias(layers: Iterable[MoELayer], routing: MarketRouting, prices: Prices = None) -> None:
    """Set every layer's "market" bias term for the next step from its pool's reply times and prices."""
    for layer in layers:
        bias_E = market_bias(
            layer.pool.reply_time_E,
            prices_of(prices, layer.name),
            routing.latency_weight,
            routing.price_weight,
        )
        layer.set_selection_bias(bias_E, term="market")
