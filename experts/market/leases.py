"""The lease book: who hosts each (layer, expert), until when, at what price, and what it cost.

Leases run `lease_term` steps; at the end the slot is re-auctioned (the holder may win again). A lease
ends at once when its provider fails: `fail_after` consecutive failed calls (a "backoff" round neither
counts nor resets), or a dead or unreachable worker; the provider then sits out auctions of that slot
for one term, and the expert moves to the next offer (`Move`). With no qualifying offer left, the
expert stays where it is under a new term (logged).

Legend: E experts.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch

from experts.errors import CheckpointError, ConfigError
from experts.market.auction import Slot, auction
from experts.market.config import BASE_UNITS, MarketConfig
from experts.market.offers import Offer, Provider, sign_offer, verify_offer
from experts.network import LinkSpec

log = logging.getLogger(__name__)

ENDS_AT_ONCE = ("dead", "unreachable")  # failure reasons that end a lease without waiting for fail_after
NEUTRAL = ("backoff",)  # not asked this round: neither a failure nor an answer


@dataclass(frozen=True)
class ComputeCharge:
    """What one provider processed for one MoE layer in one step, at its price (the ledger pays it)."""

    provider: str  # instance name, e.g. "fast_cheap/0"
    hotkey: str  # the provider's public key, hex
    layer: str  # the MoE layer (the ledger's subnet)
    tokens: int  # token rows its experts computed in answered training calls
    price_per_1k_units: int  # base units per 1,000 tokens


@dataclass
class Lease:
    layer: str
    expert: int
    provider: str
    start: int  # step the lease began after
    end: int  # step at which it is re-auctioned


@dataclass(frozen=True)
class Move:
    """Expert `expert` of `layer` leaves `source` for `target` (its link and worker name)."""

    layer: str
    expert: int
    source: str
    target: str
    link: LinkSpec
    host: str


class LeaseBook:
    """Leases per (layer, expert), from a reverse auction over the providers' signed offers."""

    def __init__(self, market: MarketConfig, providers: list[Provider], layers: list[str], num_experts: int,
                 offers: list[Offer] | None = None):  # fmt: skip
        """Leases for `layers` (more open with `open_layer`, as a model's layers are built). `offers`
        default to each provider's own signed offer; every offer must verify under the key bound to its
        provider (`OfferError` otherwise)."""
        self.market = market
        self.providers = {p.name: p for p in providers}
        hotkeys = {p.name: p.hotkey for p in providers}
        signed = offers if offers is not None else [sign_offer(p) for p in providers]
        self.offers = {offer.provider: verify_offer(offer, hotkeys) for offer in signed}
        self.num_experts = num_experts
        self.slots: list[Slot] = []
        self.leases: dict[Slot, Lease] = {}
        self.streak: Counter = Counter()  # consecutive failed calls per slot
        self.barred: dict[Slot, dict[str, int]] = {}  # slot -> {provider: step until which it may not win}
        self.moves = 0
        self.tokens_by_class: Counter = Counter()
        self.cost_milli_units = 0  # Σ tokens × price_per_1k_units: exact; / 1000 is base units
        for layer in layers:
            self.open_layer(layer)

    # --- placement -----------------------------------------------------------------------------------

    def open_layer(self, layer: str) -> None:
        """The initial auction of `layer`'s experts (leases from step 0): each must find a provider."""
        slots = [(layer, e) for e in range(self.num_experts)]
        if slots[0] in self.leases:
            return
        winners = auction(self.offers.values(), slots, self.market.requirement, load=self.load())
        unplaced = [slot for slot, winner in winners.items() if winner is None]
        if unplaced:
            capacity = sum(o.capacity for o in self.offers.values())  # per layer
            raise ConfigError(
                f"market: no qualifying offer with room for {len(unplaced)} of {len(slots)} experts "
                f"(total capacity per layer {capacity}; requirement {asdict(self.market.requirement)})"
            )
        for slot, winner in winners.items():
            self.leases[slot] = Lease(*slot, winner, 0, self.market.lease_term)
        self.slots += slots

    def provider_of(self, layer: str, expert: int) -> Provider:
        return self.providers[self.leases[(layer, expert)].provider]

    def placement(self, layer: str) -> tuple[list[LinkSpec], list[str]]:
        """(links, worker names) of a layer's experts under the current leases (opened when new)."""
        self.open_layer(layer)
        providers = [self.provider_of(layer, e) for e in range(self.num_experts)]
        return [p.link for p in providers], [p.worker_name for p in providers]

    @property
    def worker_names(self) -> list[str]:
        """One worker per provider instance, whether or not it holds a lease now."""
        return [p.worker_name for p in self.providers.values()]

    def load(self) -> Counter:
        """Slots held per (layer, provider): capacity is per MoE layer (a subnet), as a miner registers per subnet."""
        return Counter((lease.layer, lease.provider) for lease in self.leases.values())

    # --- the step's bookkeeping ----------------------------------------------------------------------

    def update(self, step: int, failures: Mapping[str, Mapping[int, str]],
               alive: Callable[[str], bool] = lambda provider: True,
               measured_ms: Mapping[str, float] | None = None) -> list[Move]:  # fmt: skip
        """After step `step`: end failed leases and re-auction ended ones; returns the experts that move.
        `failures[layer]` is that layer's `pool.last_failures`; `alive(provider)` whether its worker lives;
        `measured_ms` per provider, the reply time `requirement.max_latency_ms` is checked against."""
        failed = [slot for slot in self.slots if self._failed(slot, failures, alive)]
        for slot in failed:
            self.barred.setdefault(slot, {})[self.leases[slot].provider] = step + self.market.lease_term
        due = [slot for slot in self.slots if slot in failed or self.leases[slot].end <= step]
        if not due:
            return []
        load = self.load() - Counter((slot[0], self.leases[slot].provider) for slot in due)
        excluded = {slot: self._barred(slot, step, alive) for slot in due}
        winners = auction(self.offers.values(), due, self.market.requirement, load=load,
                          measured_ms=measured_ms, excluded=excluded)  # fmt: skip
        return [move for slot in due if (move := self._renew(slot, winners[slot], step)) is not None]

    def _failed(self, slot: Slot, failures: Mapping[str, Mapping[int, str]], alive) -> bool:
        provider = self.leases[slot].provider
        reason = failures.get(slot[0], {}).get(slot[1])
        if not alive(provider) or (reason is not None and reason in ENDS_AT_ONCE):
            return True
        if reason is None:
            self.streak[slot] = 0
        elif reason not in NEUTRAL:
            self.streak[slot] += 1
        return self.streak[slot] >= self.market.fail_after

    def _barred(self, slot: Slot, step: int, alive) -> set[str]:
        until = self.barred.get(slot, {})
        dead = {name for name in self.offers if not alive(name)}
        return dead | {name for name, end in until.items() if end > step}

    def _renew(self, slot: Slot, winner: str | None, step: int) -> Move | None:
        old = self.leases[slot]
        self.streak[slot] = 0
        if winner is None:
            log.warning("market: no other offer for %s/%d; it stays on %s", *slot, old.provider)
            winner = old.provider
        self.leases[slot] = Lease(*slot, winner, step, step + self.market.lease_term)
        if winner == old.provider:
            return None
        self.moves += 1
        target = self.providers[winner]
        log.info("market: %s/%d moves from %s to %s", *slot, old.provider, winner)
        return Move(*slot, old.provider, winner, target.link, target.worker_name)

    # --- prices and charges --------------------------------------------------------------------------

    def price_E(self, layer: str) -> torch.Tensor:
        """Each expert's price in tokens per 1,000 tokens (float), for routing."""
        experts = sorted(e for (name, e) in self.leases if name == layer)
        units = [self.provider_of(layer, e).price_per_1k_units for e in experts]
        return torch.tensor(units, dtype=torch.float64).div(BASE_UNITS).float()

    def charges(self, layer: str, answered_counts_E) -> list[ComputeCharge]:
        """One charge per provider that computed rows of `layer` this step (`answered_counts_E[e]`: rows
        expert e computed in answered training calls); also counted in the market's metrics."""
        tokens: Counter = Counter()
        for e, count in enumerate(torch.as_tensor(answered_counts_E).tolist()):
            if count:
                tokens[self.leases[(layer, e)].provider] += int(count)
        charges = []
        for name in sorted(tokens):
            provider = self.providers[name]
            charges.append(
                ComputeCharge(name, provider.hotkey, layer, tokens[name], provider.price_per_1k_units)
            )
            self.tokens_by_class[provider.provider_class] += tokens[name]
            self.cost_milli_units += tokens[name] * provider.price_per_1k_units
        return charges

    def metrics(self) -> dict[str, float]:
        """`market/moves`, `market/cost` (tokens, cumulative) and each provider class's share of tokens."""
        total = sum(self.tokens_by_class.values())
        shares = {
            f"market/share/{name}": self.tokens_by_class[name] / total if total else 0.0
            for name in sorted({p.provider_class for p in self.providers.values()})
        }
        return {"market/moves": float(self.moves), "market/cost": self.cost_milli_units / 1000 / BASE_UNITS,
                **shares}  # fmt: skip

    # --- checkpoints ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain lists and numbers only (checkpoints load with `weights_only=True`)."""
        return {
            "leases": [
                [lease.layer, lease.expert, lease.provider, lease.start, lease.end]
                for lease in self.leases.values()
            ],  # fmt: skip
            "streak": [[layer, e, n] for (layer, e), n in sorted(self.streak.items()) if n],
            "barred": [
                [layer, e, name, end]
                for (layer, e), until in sorted(self.barred.items())
                for name, end in sorted(until.items())
            ],  # fmt: skip
            "moves": self.moves,
            "tokens_by_class": sorted(self.tokens_by_class.items()),
            "cost_milli_units": self.cost_milli_units,
        }

    def load_state_dict(self, state: dict) -> None:
        leases = {(layer, int(e)): Lease(layer, int(e), provider, int(start), int(end))
                  for layer, e, provider, start, end in state["leases"]}  # fmt: skip
        unknown = sorted({lease.provider for lease in leases.values()} - set(self.providers))
        if set(leases) != set(self.slots) or unknown:  # the model's layers are open by now
            raise CheckpointError(
                f"the checkpoint's leases do not fit this market (unknown providers {unknown}, "
                f"{len(leases)} leases for {len(self.slots)} experts)"
            )
        self.leases = {slot: leases[slot] for slot in self.slots}
        self.streak = Counter({(layer, int(e)): int(n) for layer, e, n in state["streak"]})
        self.barred = {}
        for layer, e, name, end in state["barred"]:
            self.barred.setdefault((layer, int(e)), {})[name] = int(end)
        self.moves = int(state["moves"])
        self.tokens_by_class = Counter({name: int(n) for name, n in state["tokens_by_class"]})
        self.cost_milli_units = int(state["cost_milli_units"])
