"""The market config (Hydra group `market`): provider classes, the lease term, what an offer must meet.

`market: null` (the default) means no market: experts stay where the transport puts them. A market
without providers only routes (latency and price terms over the transport's own simulated network):
no leases, no charges. Provider
class `c` with `count: n` gives instances `c/0` … `c/{n-1}`; each offers `capacity` experts in each
MoE layer (a layer is a subnet, and a miner registers per subnet) at `price` tokens per 1,000 tokens processed, over its simulated `link`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from experts.errors import ConfigError
from experts.network import LinkSpec
from router.typed_config import typed_config

BASE_UNITS = 10**9  # base units per token, as in the ledger


@dataclass
class ProviderClassConfig:
    count: int = 1  # instances of this class
    capacity: int = 4  # experts one instance hosts in each MoE layer
    device: str = "cpu"  # what the provider declares it computes on
    throughput: float = 0.0  # tokens per second it declares (checked against `requirement`)
    price: float = 0.0  # tokens per 1,000 tokens processed; a multiple of 1e-9
    link: LinkSpec = field(default_factory=LinkSpec)  # its simulated network


@dataclass
class RequirementConfig:
    min_throughput: float = 0.0  # offers declaring less do not win
    max_latency_ms: float | None = None  # offers slower than this (declared, or measured) do not win


@dataclass
class MarketConfig:
    """Every key's meaning; `latency_weight` … `treasury` are read by routing and the ledger."""

    providers: dict[str, ProviderClassConfig] = field(default_factory=dict)
    lease_term: int = 100  # steps; at the end a lease is re-auctioned (the same provider may win again)
    requirement: RequirementConfig = field(default_factory=RequirementConfig)
    fail_after: int = 3  # consecutive failed calls (or a dead worker: at once) that end a lease
    latency_weight: float = 0.0  # routing term for expected reply time; 0 = today's routing
    price_weight: float = 0.0  # routing term for price
    latency_ema: float = 0.9  # EMA factor of the measured reply time
    straggler_quantile: float | None = None  # null: the transport's fixed straggler_cutoff
    treasury: float = 1000.0  # tokens funded to the owner's treasury at genesis


def price_units(price: float, key: str) -> int:
    """`price` (tokens per 1k tokens) in base units per 1k tokens; it must be >= 0 and whole in base units."""
    units = round(price * BASE_UNITS)
    if price < 0 or abs(units - price * BASE_UNITS) > 1e-6 * max(1.0, abs(price * BASE_UNITS)):
        raise ConfigError(f"{key}={price!r} must be >= 0 and a multiple of 1e-9 tokens")
    return units


def as_market_config(cfg) -> MarketConfig | None:
    """`cfg` (a config node, a mapping, a `MarketConfig` or None) as a checked `MarketConfig`."""
    if cfg is None:
        return None
    market = typed_config(MarketConfig, cfg, "market")
    checks = [
        (market.lease_term >= 1, "lease_term", "must be at least 1"),
        (market.fail_after >= 1, "fail_after", "must be at least 1"),
        (market.requirement.min_throughput >= 0, "requirement.min_throughput", "must be >= 0"),
        (
            _none_or(market.requirement.max_latency_ms, lambda v: v > 0),
            "requirement.max_latency_ms",
            "must be > 0",
        ),
        (0 <= market.latency_ema < 1, "latency_ema", "must be in [0, 1)"),
        (
            _none_or(market.straggler_quantile, lambda q: 0 < q <= 1),
            "straggler_quantile",
            "must be in (0, 1]",
        ),
        (
            min(market.latency_weight, market.price_weight) >= 0,
            "latency_weight",
            "and price_weight must be >= 0",
        ),
        (market.treasury >= 0, "treasury", "must be >= 0"),
    ]
    for ok, key, rule in checks:
        if not ok:
            raise ConfigError(f"market.{key}={_value(market, key)!r} {rule}")
    for name, provider in market.providers.items():
        _check_class(name, provider)
    return market


def _check_class(name: str, provider: ProviderClassConfig) -> None:
    key = f"market.providers.{name}"
    if not name or "/" in name:
        raise ConfigError(f"{key}: a provider class name must be non-empty and have no '/'")
    for ok, field_, rule in [
        (provider.count >= 1, "count", "must be at least 1"),
        (provider.capacity >= 1, "capacity", "must be at least 1"),
        (provider.throughput >= 0, "throughput", "must be >= 0"),
    ]:
        if not ok:
            raise ConfigError(f"{key}.{field_}={getattr(provider, field_)!r} {rule}")
    price_units(provider.price, f"{key}.price")


def _none_or(value, rule) -> bool:
    return value is None or rule(value)


def _value(market: MarketConfig, key: str):
    obj = market
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj
