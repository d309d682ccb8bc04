"""The market core (experts/market/): signed offers, the reverse auction, leases, charges, and moving an
expert in `LocalPool` (its simulated link changes, its parameters stay)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from experts.errors import ConfigError, OfferError
from experts.identity import Identity
from experts.market import (
    ComputeCharge,
    LeaseBook,
    MarketConfig,
    ProviderClassConfig,
    RequirementConfig,
    as_market_config,
    build_lease_book,
    build_providers,
    sign_offer,
)
from experts.market.offers import provider_identity
from experts.modules import FFN, ExpertsConfig
from experts.network import LinkSpec
from experts.transport import LocalTransport, LocalTransportConfig, Placement
from router.plan import build_plan

LAYER = "l0"


def market(**changes) -> MarketConfig:
    """Five classes chosen so that the auction must skip the cheapest two (requirement) and break a tie."""
    providers = {
        "a": ProviderClassConfig(capacity=2, throughput=100, price=0.001),
        "b": ProviderClassConfig(capacity=1, throughput=100, price=0.001),  # ties with a: a sorts first
        "c": ProviderClassConfig(capacity=3, throughput=10, price=0.0005),  # below min_throughput
        "d": ProviderClassConfig(count=2, capacity=5, throughput=100, price=0.002),
        "e": ProviderClassConfig(capacity=3, throughput=100, price=0.0001, link=LinkSpec(latency_ms=40)),
    }
    requirement = RequirementConfig(min_throughput=50, max_latency_ms=50)  # e: 2 × 40 ms declared
    return dataclasses.replace(MarketConfig(providers, requirement=requirement), **changes)


def book(cfg: MarketConfig | None = None, num_experts: int = 5) -> LeaseBook:
    cfg = cfg or market()
    return LeaseBook(cfg, build_providers(cfg, seed=3), [LAYER], num_experts)


def holders(leases: LeaseBook) -> list[str]:
    return [leases.provider_of(LAYER, e).name for e in range(leases.num_experts)]


def test_the_auction_picks_the_cheapest_qualifying_offers_within_capacity():
    assert holders(book()) == ["a/0", "a/0", "b/0", "d/0", "d/0"]  # worked out by hand
    assert book().price_E(LAYER).tolist() == pytest.approx([0.001, 0.001, 0.001, 0.002, 0.002])


def test_no_room_for_every_expert_is_a_config_error_naming_the_capacity():
    with pytest.raises(ConfigError, match="no qualifying offer with room for 3 of 16 experts"):  # 13 qualify
        book(market(requirement=RequirementConfig(min_throughput=50, max_latency_ms=50)), num_experts=16)


def test_a_forged_an_unsigned_and_a_stolen_offer_are_rejected():
    cfg = market()
    providers = build_providers(cfg, seed=3)
    honest = [sign_offer(p) for p in providers]
    forged = dataclasses.replace(honest[0], price_per_1k_units=1)  # signed at another price
    unsigned = dataclasses.replace(honest[0], signature=b"")
    thief = Identity.generate()  # signs as a/0 with its own key
    stolen = dataclasses.replace(honest[0], hotkey=thief.hotkey)
    stolen = dataclasses.replace(stolen, signature=thief.sign(stolen.message()))
    for bad, why in [(forged, "forged"), (unsigned, "unsigned"), (stolen, "not the key bound")]:
        with pytest.raises(OfferError, match=rf"provider 'a/0'.*{why}"):
            LeaseBook(cfg, providers, [LAYER], 5, offers=[bad, *honest[1:]])


def test_simulated_provider_keys_are_a_function_of_the_seed_and_the_name():
    assert provider_identity(3, "a/0").hotkey == provider_identity(3, "a/0").hotkey
    assert len({provider_identity(s, n).hotkey for s in (3, 4) for n in ("a/0", "a/1")}) == 4


def test_at_term_end_leases_are_re_auctioned_against_measured_reply_times():
    leases = book(market(lease_term=3))
    assert leases.update(1, {}) == []
    assert leases.update(2, {}) == []
    assert leases.update(3, {}) == []  # the same offers win again under a new term
    assert {lease.end for lease in leases.leases.values()} == {6}
    moves = leases.update(6, {}, measured_ms={"e/0": 20.0})  # e is faster than it declared: it qualifies
    assert holders(leases) == ["e/0", "e/0", "e/0", "a/0", "a/0"]
    assert [(m.expert, m.source, m.target) for m in moves] == [
        (0, "a/0", "e/0"), (1, "a/0", "e/0"), (2, "b/0", "e/0"), (3, "d/0", "a/0"), (4, "d/0", "a/0")
    ]  # fmt: skip
    assert moves[0].link == LinkSpec(latency_ms=40)
    assert moves[0].host == "e-0"
    assert leases.metrics()["market/moves"] == 5


def test_consecutive_failures_or_a_dead_worker_move_the_lease_at_once():
    leases = book(market(fail_after=2))
    assert leases.update(1, {LAYER: {0: "timeout"}}) == []
    assert leases.update(2, {LAYER: {0: "backoff"}}) == []  # neither a failure nor an answer
    moves = leases.update(3, {LAYER: {0: "straggler"}})
    assert [(m.expert, m.source, m.target) for m in moves] == [(0, "a/0", "d/0")]  # b/0 is full
    assert leases.update(4, {LAYER: {1: "timeout"}}) == []
    assert leases.update(5, {}) == []  # an answer resets the streak
    assert leases.update(6, {LAYER: {1: "timeout"}}) == []
    moves = leases.update(7, {}, alive=lambda provider: provider != "d/0")
    # a/0 has room again but sits out slot 0, which it failed
    assert [(m.expert, m.target) for m in moves] == [(0, "d/1"), (3, "a/0"), (4, "d/1")]
    assert [(m.expert, m.target) for m in leases.update(8, {LAYER: {1: "dead"}})] == [
        (1, "d/0")
    ]  # d/0 is back


def test_charges_are_tokens_times_price_per_provider_exactly():
    leases = book()
    charges = leases.charges(LAYER, torch.tensor([3, 0, 2, 5, 1]))
    hotkeys = {name: provider_identity(3, name).hotkey for name in ("a/0", "b/0", "d/0")}
    assert charges == [
        ComputeCharge("a/0", hotkeys["a/0"], LAYER, 3, 1_000_000),
        ComputeCharge("b/0", hotkeys["b/0"], LAYER, 2, 1_000_000),
        ComputeCharge("d/0", hotkeys["d/0"], LAYER, 6, 2_000_000),
    ]
    assert all(isinstance(c.tokens, int) and isinstance(c.price_per_1k_units, int) for c in charges)
    metrics = leases.metrics()
    assert metrics["market/cost"] == pytest.approx((3 + 2) * 0.001 / 1000 + 6 * 0.002 / 1000)
    assert metrics["market/share/a"] == pytest.approx(3 / 11)
    assert metrics["market/share/c"] == 0


def test_the_lease_book_round_trips_through_its_state():
    leases = book(market(fail_after=1, lease_term=4))
    leases.update(1, {LAYER: {0: "timeout"}})
    leases.charges(LAYER, torch.tensor([1, 2, 3, 4, 5]))
    copy = book(market(fail_after=1, lease_term=4))
    copy.load_state_dict(leases.state_dict())
    assert copy.state_dict() == leases.state_dict()
    for step, failures in [(2, {LAYER: {3: "timeout"}}), (4, {}), (5, {LAYER: {0: "dead"}})]:
        assert copy.update(step, failures) == leases.update(step, failures)
    assert copy.state_dict() == leases.state_dict()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("price", -0.01, r"market.providers.a.price=-0.01 must be >= 0"),
        ("price", 1e-10, r"market.providers.a.price=1e-10 .*multiple of 1e-9"),
        ("count", 0, r"market.providers.a.count=0 must be at least 1"),
        ("bogus", 1, r"market.providers.a.bogus"),
    ],
)
def test_bad_provider_values_are_config_errors_naming_the_key(key, value, message):
    node = {"providers": {"a": {key: value}}}
    with pytest.raises(ConfigError, match=message):
        as_market_config(node)


def test_bad_market_values_are_config_errors_naming_the_key():
    with pytest.raises(ConfigError, match="market.lease_term=0"):
        as_market_config({"providers": {"a": {}}, "lease_term": 0})
    assert as_market_config(None) is None
    assert (
        build_lease_book({"providers": {}, "latency_weight": 1.0}, [LAYER], 4, seed=0) is None
    )  # routing only


def test_moving_a_local_expert_changes_its_link_and_keeps_its_parameters():
    cfg = LocalTransportConfig(forward_timeout=10.0)
    transport = LocalTransport(cfg, device=torch.device("cpu"), run_dir=None, seed=0)
    torch.manual_seed(0)
    experts = [FFN(8, 16) for _ in range(2)]
    placement = Placement([LinkSpec(latency_ms=5), LinkSpec(latency_ms=5)], ["p-0", "p-0"])
    pool = transport.make_pool(LAYER, experts, ExpertsConfig(num=2, d_ff=16), placement)
    plan = build_plan(
        torch.arange(4), torch.zeros(4, dtype=torch.long), torch.ones(4), num_tokens=4, num_experts=2
    )
    x_AD = torch.randn(4, 8)
    before = pool(x_AD, plan).y_AD
    assert pool.network_clock_s == pytest.approx(0.010)  # two one-way latencies of 5 ms
    params = {k: v.clone() for k, v in pool.experts[0].state_dict().items()}
    pool.move_expert(0, LinkSpec(latency_ms=50), "q-0")
    after = pool(x_AD, plan).y_AD
    assert pool.network_clock_s == pytest.approx(0.010 + 0.100)
    assert pool.hosts == ["q-0", "p-0"]
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    for name, value in pool.experts[0].state_dict().items():
        torch.testing.assert_close(value, params[name], atol=0, rtol=0)
