"""The reverse auction: the cheapest offers that meet the requirement win, up to their capacity per layer.

Slots (one per (layer, expert)) are filled in order, each by the cheapest qualifying offer that still
has room; equal prices go to the provider whose name sorts first. An offer's reply time is the
measured one when given (`measured_ms`, per provider), else twice its declared one-way latency.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from experts.market.config import RequirementConfig
from experts.market.offers import Offer

Slot = tuple[str, int]  # (layer, expert)


def reply_ms(offer: Offer, measured_ms: Mapping[str, float] | None) -> float:
    """The reply time the requirement is checked against: measured when known, else 2 × one-way latency."""
    if measured_ms is not None and offer.provider in measured_ms:
        return float(measured_ms[offer.provider])
    return 2.0 * offer.latency_ms


def meets(offer: Offer, requirement: RequirementConfig, measured_ms: Mapping[str, float] | None) -> bool:
    if offer.throughput < requirement.min_throughput:
        return False
    limit = requirement.max_latency_ms
    return limit is None or reply_ms(offer, measured_ms) <= limit


def ranked(offers: Iterable[Offer]) -> list[Offer]:
    """Cheapest first; equal prices by provider name."""
    return sorted(offers, key=lambda offer: (offer.price_per_1k_units, offer.provider))


def auction(
    offers: Iterable[Offer],
    slots: list[Slot],
    requirement: RequirementConfig,
    *,
    load: Counter | None = None,
    measured_ms: Mapping[str, float] | None = None,
    excluded: Mapping[Slot, set[str]] | None = None,
) -> dict[Slot, str | None]:
    """Winner (provider name) per slot, None where no qualifying offer has room in the slot's layer.
    `load[(layer, provider)]` counts the slots a provider already holds in a layer (outside `slots`);
    `excluded[slot]` names providers that may not win that slot (one that just failed it)."""
    load = Counter(load or {})
    qualifying = [offer for offer in ranked(offers) if meets(offer, requirement, measured_ms)]
    winners: dict[Slot, str | None] = {}
    for slot in slots:
        barred = (excluded or {}).get(slot, set())
        winner = next(
            (o for o in qualifying if o.provider not in barred and load[(slot[0], o.provider)] < o.capacity),
            None,
        )
        winners[slot] = winner.provider if winner is not None else None
        if winner is not None:
            load[(slot[0], winner.provider)] += 1
    return winners
