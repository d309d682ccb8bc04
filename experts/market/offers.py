"""Providers and their signed offers.

A provider (a miner that rents out compute) is an instance `<class>/<i>` of a provider class; it
declares what it offers (device, capacity, throughput, price, one-way latency) in an `Offer` signed
with its Ed25519 key (`experts.identity`). The coordinator accepts only offers whose signature
verifies under the hotkey they name (`verify_offer`).

Simulated providers' keys are derived from the run's seed and the provider's name (`provider_identity`):
a run and its resume see the same hotkeys, and the ledger can name them, without key files to keep.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from experts.errors import OfferError
from experts.identity import Identity, verify_signature
from experts.market.config import MarketConfig, price_units
from experts.network import LinkSpec


@dataclass(frozen=True)
class Provider:
    """One provider instance: its name, class, key and what it offers."""

    name: str  # "<class>/<i>"
    provider_class: str
    identity: Identity
    capacity: int
    device: str
    throughput: float
    price_per_1k_units: int  # base units per 1,000 tokens processed
    link: LinkSpec

    @property
    def hotkey(self) -> str:
        return self.identity.hotkey

    @property
    def worker_name(self) -> str:
        """The name of the worker that serves this provider (worker names allow no '/')."""
        return worker_name(self.name)


def worker_name(provider: str) -> str:
    return provider.replace("/", "-")


@dataclass(frozen=True)
class Offer:
    """What a provider offers, as it signed it; `signature` is over `message()`."""

    provider: str
    hotkey: str
    capacity: int
    device: str
    throughput: float
    price_per_1k_units: int
    latency_ms: float  # declared one-way latency of its link
    signature: bytes = b""

    def message(self) -> bytes:
        fields = {k: v for k, v in asdict(self).items() if k != "signature"}
        return json.dumps(fields, sort_keys=True).encode()


def provider_identity(seed: int, name: str) -> Identity:
    """A simulated provider's key pair: a pure function of (run seed, provider name)."""
    return Identity.from_seed(hashlib.blake2b(repr((seed, "market", name)).encode(), digest_size=32).digest())


def build_providers(market: MarketConfig, seed: int) -> list[Provider]:
    """Every provider instance the config lists, sorted by name."""
    providers = []
    for class_name, spec in market.providers.items():
        units = price_units(spec.price, f"market.providers.{class_name}.price")
        for i in range(spec.count):
            name = f"{class_name}/{i}"
            providers.append(
                Provider(
                    name,
                    class_name,
                    provider_identity(seed, name),
                    spec.capacity,
                    spec.device,
                    spec.throughput,
                    units,
                    spec.link,
                )  # fmt: skip
            )
    return sorted(providers, key=lambda p: p.name)


def sign_offer(provider: Provider) -> Offer:
    unsigned = Offer(provider.name, provider.hotkey, provider.capacity, provider.device, provider.throughput,
                     provider.price_per_1k_units, provider.link.latency_ms)  # fmt: skip
    return Offer(**{**asdict(unsigned), "signature": provider.identity.sign(unsigned.message())})


def verify_offer(offer: Offer, known_hotkeys: dict[str, str] | None = None) -> Offer:
    """`offer` when it is well formed and signed by the key it names (and, given `known_hotkeys`, that
    key is the one bound to its provider's name); else `OfferError` naming the provider and why."""
    who = f"offer of provider {offer.provider!r}"
    if known_hotkeys is not None and known_hotkeys.get(offer.provider) != offer.hotkey:
        raise OfferError(f"{who}: hotkey {offer.hotkey[:16]}… is not the key bound to that provider")
    if not offer.signature:
        raise OfferError(f"{who} is unsigned")
    if not verify_signature(offer.hotkey, offer.message(), offer.signature):
        raise OfferError(f"{who}: the signature does not verify under hotkey {offer.hotkey[:16]}… (forged)")
    if offer.capacity < 1 or offer.price_per_1k_units < 0 or offer.throughput < 0 or offer.latency_ms < 0:
        raise OfferError(f"{who} is malformed: capacity, price, throughput and latency must be >= 0")
    return offer
