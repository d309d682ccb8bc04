"""Each expert's expected reply time (`pool.reply_time_E`) and the straggler cut-off that follows it:
against hand-computed virtual times in `LocalPool`, against real link delays in `RemotePool`."""

from __future__ import annotations

import math
import time

import pytest
import torch

from experts.errors import ConfigError
from experts.latency import ReplyTimes, expected_wait_s
from experts.network import FaultPolicy, LinkSpec, NetworkConfig, Round, VirtualNetwork
from experts.pool import LocalPool
from tests.experts.test_remote import (
    EXPERTS_CFG,
    NUM_TOKENS,
    PAIRS,
    D,
    E,
    make_experts,
    plan_of,
    process_transport,
    run_layer,
)

# PAIRS: experts 0, 1, 2 have tokens, expert 3 has none; every token with an expert has one on 0 or 2


def local_pool(network: NetworkConfig, **policy) -> LocalPool:
    policy = FaultPolicy(**{"forward_timeout": 10.0, "straggler_cutoff": 1.0, "backoff_base": 0, **policy})
    return LocalPool(make_experts(), policy=policy, network=VirtualNetwork(network, policy, E, layer="l0"))


def hetero(slow_ms: float = 80.0, **expert1) -> NetworkConfig:
    """Every link 5 ms one way, expert 1's `slow_ms` (a constant link: its round trip is exact)."""
    return NetworkConfig(default=LinkSpec(latency_ms=5.0), experts={1: {"latency_ms": slow_ms, **expert1}})


def test_the_estimate_of_a_constant_link_is_its_round_trip_exactly():
    pool = local_pool(hetero())
    assert torch.isnan(pool.reply_time_E).all()  # nothing measured yet
    for step in range(5):
        run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS, seed=step)
    assert pool.reply_time_E[[0, 2]].tolist() == [0.010, 0.010]
    assert pool.reply_time_E[1].item() == 0.160
    assert math.isnan(pool.reply_time_E[3].item())  # never asked: never measured


def test_the_estimate_is_an_ema_of_the_measured_reply_times():
    times = ReplyTimes(2, ema=0.9)
    times.observe({0: 1.0})
    times.observe({0: 2.0, 1: 4.0})
    assert times.reply_time_E[0].item() == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)
    assert times.reply_time_E[1].item() == 4.0  # the first measurement sets it
    with pytest.raises(ConfigError, match="latency_ema=1.0"):
        ReplyTimes(2, ema=1.0)


def test_a_dropped_reply_counts_as_the_deadline_and_a_cut_one_never_lowers_the_estimate():
    pool = local_pool(hetero(drop_prob=1.0), straggler_cutoff=0.5)
    run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS)
    assert pool.last_failures == {1: "straggler"}
    # every token has its k_min answer at 10 ms, so the round waited for expert 1 until 10 ms + 0.5 s
    assert pool.reply_time_E[1].item() == pytest.approx(0.510)
    times = ReplyTimes(1, ema=0.5)
    times.observe({0: 2.0})
    times.observe({0: 1.0}, unanswered=[0])  # no reply within 1 s: it takes at least 1 s, not less than 2
    assert times.reply_time_E[0].item() == 2.0


def test_evaluation_passes_and_validation_do_not_update_the_estimate():
    pool = local_pool(hetero())
    with pool.evaluation_calls():
        run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS)
    plan, _ = plan_of(PAIRS, NUM_TOKENS)
    with torch.no_grad():
        pool(torch.randn(len(PAIRS), D), plan)
    assert torch.isnan(pool.reply_time_E).all()
    run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS)
    assert pool.reply_time_E[1].item() == 0.160


def test_the_estimates_travel_with_the_pool_state():
    pool = local_pool(hetero())
    run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS)
    fresh = local_pool(hetero())
    fresh.load_state_dict(pool.state_dict())
    torch.testing.assert_close(fresh.reply_time_E, pool.reply_time_E, equal_nan=True)
    state = pool.state_dict()
    del state["reply_time_E"]  # a checkpoint from before the estimates: they start unmeasured
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.reply_time_E, pool.reply_time_E, equal_nan=True)


def test_the_adaptive_cut_off_drops_a_slow_expert_the_fixed_one_waits_for():
    fixed, adaptive = local_pool(hetero()), local_pool(hetero(), straggler_quantile=0.5)
    for pool in (fixed, adaptive):
        run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS)  # measures: 10, 160, 10 ms
        assert pool.last_failures == {}  # the first round waits as the fixed rule does
        clock = pool.network.clock_s
        run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS)
        pool.round_s = pool.network.clock_s - clock
    assert fixed.last_failures == {}
    assert fixed.round_s == pytest.approx(0.160)
    # the median expected reply of experts 0, 1, 2 is 10 ms: expert 1 (160 ms) is cut there
    assert adaptive.last_failures == {1: "straggler"}
    assert adaptive.round_s == pytest.approx(0.010)


def test_the_adaptive_deadline_is_the_quantile_of_the_asked_experts_and_never_before_k_min():
    reply_time_E = torch.tensor([0.1, 0.2, math.nan, 0.4], dtype=torch.float64)
    assert expected_wait_s(reply_time_E, [0, 1, 2, 3], 1.0) == pytest.approx(0.4)  # NaN: not measured
    assert expected_wait_s(reply_time_E, [0, 1], 0.5) == pytest.approx(0.15)
    assert expected_wait_s(reply_time_E, [2], 0.5) is None  # none measured: the fixed cut-off
    assert expected_wait_s(reply_time_E, [0, 1], None) is None
    plan, _ = plan_of(PAIRS, NUM_TOKENS)
    policy = FaultPolicy(straggler_quantile=0.5)
    round_ = Round(plan.token_idx, plan.split_sizes(), [0, 1, 2], NUM_TOKENS, policy, 1.0, reply_time_E)
    round_.answer(0, now=1.3)
    round_.answer(2, now=1.35)  # k_min met after the expected 0.15 s: stragglers are cut at once
    assert round_.deadline == 1.35
    with pytest.raises(ConfigError, match="straggler_quantile=0"):
        FaultPolicy(straggler_quantile=0.0)


@pytest.mark.timeout(60)
def test_process_pool_reply_times_are_positive_and_ordered_with_link_latency(tmp_path):
    network = NetworkConfig(experts={1: {"latency_ms": 60.0}, 2: {"latency_ms": 20.0}})
    with process_transport(
        tmp_path, workers=2, threads=1, network=network, straggler_quantile=None
    ) as transport:
        pool = transport.make_pool("latency", make_experts(), EXPERTS_CFG)
        for step in range(3):
            run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS, seed=step)
        with pool.evaluation_calls():
            before = pool.reply_time_E.clone()
            run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS)
        reply_s = pool.reply_time_E.tolist()
    torch.testing.assert_close(
        pool.reply_time_E, before, equal_nan=True, rtol=0, atol=0
    )  # evaluation: no update
    assert 0 < reply_s[0] < reply_s[2] < reply_s[1]
    assert reply_s[1] >= 0.120
    assert reply_s[2] >= 0.040
    assert math.isnan(reply_s[3])


@pytest.mark.timeout(60)
def test_the_process_pool_cuts_a_slow_expert_at_the_measured_quantile(tmp_path):
    network = NetworkConfig(experts={1: {"latency_ms": 400.0}})
    with process_transport(
        tmp_path, workers=2, threads=1, network=network, straggler_quantile=0.5
    ) as transport:
        pool = transport.make_pool("adaptive", make_experts(), EXPERTS_CFG)
        run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS)  # unmeasured: the fixed cut-off waits for it
        assert pool.last_failures == {}
        tick = time.monotonic()
        run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS)
        elapsed = time.monotonic() - tick
    assert pool.last_failures == {1: "straggler"}
    assert elapsed < 0.6  # its reply takes 0.8 s; cut at the median expected one (experts 0, 2: ms)
