"""A compute marketplace (Akash-style): providers offer capacity at a price in signed offers, a reverse
auction leases each (layer, expert) to one for a term, and each step's work is charged at its price.

`build_lease_book(cfg, layers, num_experts, seed)` is the engine's entry point (None when `market: null`).
"""

from __future__ import annotations

from experts.market.auction import auction
from experts.market.config import MarketConfig, ProviderClassConfig, RequirementConfig, as_market_config
from experts.market.leases import ComputeCharge, Lease, LeaseBook, Move
from experts.market.offers import Offer, Provider, build_providers, sign_offer, verify_offer

__all__ = [
    "ComputeCharge",
    "Lease",
    "LeaseBook",
    "MarketConfig",
    "Move",
    "Offer",
    "Provider",
    "ProviderClassConfig",
    "RequirementConfig",
    "as_market_config",
    "auction",
    "build_lease_book",
    "build_providers",
    "sign_offer",
    "verify_offer",
]


def build_lease_book(cfg, layers: list[str], num_experts: int, seed: int) -> LeaseBook | None:
    """The run's lease book from the `market` config node (None: no market)."""
    market = as_market_config(cfg)
    if market is None or not market.providers:  # no providers: the market only routes (no leases)
        return None
    return LeaseBook(market, build_providers(market, seed), layers, num_experts)
