"""Routing that sees time and cost: the market's selection-bias terms (`market_bias`) against their
formula, their effect on routing in a hand-built case, and training with a market against without."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import router
from experts.modules import FFN
from experts.network import FaultPolicy, LinkSpec, NetworkConfig, VirtualNetwork
from experts.pool import LocalPool
from moe.engine.market_routing import MarketRouting, apply_market_bias, market_routing
from moe.errors import ConfigError
from moe.incentives.poi.feedback import market_bias
from moe.nn.layer import MoELayer
from tests.helpers import keep_only_checkpoint

D, E = 16, 4
TINY = ["debug=default", "data=clusters", "transport=local", "poi=gate", "~ledger", "trainer.threads=1"]
SLOW_EXPERT_3 = ["transport.network.default.latency_ms=5", "transport.network.experts={3: {latency_ms: 80}}"]


def market(latency_weight: float = 0.0, price_weight: float = 0.0, quantile: str = "null") -> str:
    return (
        f"market={{latency_weight: {latency_weight}, price_weight: {price_weight}, latency_ema: 0.9, "
        f"straggler_quantile: {quantile}}}"
    )


def test_market_bias_follows_its_formula():
    reply_time_E = torch.tensor([0.01, 0.01, 0.04, math.nan], dtype=torch.float64)  # mean of known: 0.02
    price_E = torch.tensor([1.0, 2.0, 3.0, 2.0])  # mean 2
    bias_E = market_bias(reply_time_E, price_E, latency_weight=2.0, price_weight=0.5)
    expected_E = [2.0 * 0.5 + 0.5 * 0.5, 2.0 * 0.5 + 0.0, -2.0 * 1.0 - 0.5 * 0.5, 0.0]
    torch.testing.assert_close(bias_E, torch.tensor(expected_E))
    assert bias_E.dtype == torch.float32
    # scale-free: the same in milliseconds and at ten times every price
    torch.testing.assert_close(market_bias(reply_time_E * 1e3, price_E * 10, 2.0, 0.5), bias_E)


def test_zero_weights_unmeasured_experts_and_bad_input_give_zero_or_a_clear_error():
    reply_time_E = torch.tensor([0.01, 0.3, 0.02, 0.05], dtype=torch.float64)
    zero_E = market_bias(reply_time_E, torch.tensor([1.0, 9.0, 1.0, 1.0]), 0.0, 0.0)
    assert torch.equal(zero_E, torch.zeros(E))
    assert not zero_E.signbit().any()
    assert torch.equal(market_bias(torch.full((E,), math.nan), None, 3.0, 1.0), torch.zeros(E))
    with pytest.raises(ConfigError, match="latency_weight=-1"):
        market_bias(reply_time_E, None, -1.0, 0.0)
    with pytest.raises(ConfigError, match=r"price_E of shape \(3,\)"):
        market_bias(reply_time_E, torch.ones(3), 0.0, 1.0)
    assert market_routing(None) is None
    with pytest.raises(ConfigError, match="market.latency_weight"):
        market_routing({"latency_weight": "fast", "providers": {}})


def measured_layer(top_k: int = 2) -> MoELayer:
    """A top-k layer over 4 experts whose pool has measured expert 3 at 16× the others' reply time."""
    torch.manual_seed(0)
    network = NetworkConfig(default=LinkSpec(latency_ms=5.0), experts={3: {"latency_ms": 80.0}})
    policy = FaultPolicy()
    pool = LocalPool(
        [FFN(D, 32) for _ in range(E)], policy=policy, network=VirtualNetwork(network, policy, E)
    )
    layer = MoELayer("layer0", router.build("topk", D, E, top_k=top_k), pool)
    layer(torch.randn(4, 16, D))  # a training call: every expert gets tokens and is measured
    assert pool.reply_time_E.tolist() == [0.01, 0.01, 0.01, 0.16]
    return layer


@pytest.mark.parametrize("prices", [None, torch.ones(E), lambda layer: torch.ones(E)])
def test_a_large_latency_weight_routes_almost_no_tokens_to_the_slow_expert(prices):
    layer = measured_layer()
    x_BTD = torch.randn(16, 32, D)
    with torch.no_grad():
        layer(x_BTD)
        plain = layer.last_plan.counts.tolist()
        apply_market_bias([layer], MarketRouting(latency_weight=5.0, price_weight=1.0), prices)
        layer(x_BTD)
        slow_avoided = layer.last_plan.counts.tolist()
    assert plain[3] > 0.15 * sum(plain)  # the control: without the market it gets its share
    assert slow_avoided[3] <= 0.01 * sum(slow_avoided)
    assert layer.selection_bias_terms["market"][3] == pytest.approx(-5.0 * (0.16 / 0.0475 - 1))


def test_the_price_term_moves_tokens_to_the_cheaper_experts():
    layer = measured_layer(top_k=1)
    x_BTD = torch.randn(16, 32, D)
    price_E = torch.tensor([0.1, 0.01, 0.01, 0.01])  # expert 0 is dear
    with torch.no_grad():
        apply_market_bias([layer], MarketRouting(price_weight=0.0), price_E)
        layer(x_BTD)
        plain = layer.last_plan.counts.tolist()
        apply_market_bias([layer], MarketRouting(price_weight=3.0), price_E)
        layer(x_BTD)
        priced = layer.last_plan.counts.tolist()
    assert priced[0] < plain[0] // 4


def train_run(run_dir: Path, *overrides: str) -> tuple[dict, list[float]]:
    from moe.engine.loop import train
    from moe.engine.metrics import read_metrics
    from tests.helpers import compose

    summary = train(compose([*TINY, *overrides, f"run_dir={run_dir}"]))
    return summary, [e["train/loss"] for e in read_metrics(run_dir) if "train/loss" in e]


@pytest.mark.timeout(120)
def test_zero_weights_train_bit_identically_to_no_market(tmp_path):
    none, none_losses = train_run(tmp_path / "none", *SLOW_EXPERT_3)
    zero, zero_losses = train_run(tmp_path / "zero", *SLOW_EXPERT_3, market(0.0, 0.0))
    _, on_losses = train_run(tmp_path / "on", *SLOW_EXPERT_3, market(3.0))
    assert zero_losses == none_losses
    assert zero["val/loss"] == none["val/loss"]
    assert on_losses != none_losses  # the control: a weight changes the routing


@pytest.mark.timeout(120)
def test_a_resumed_run_with_a_market_routes_as_the_uninterrupted_one(tmp_path):
    common = [*SLOW_EXPERT_3, market(2.0, quantile="0.5"), "trainer.max_steps=8", "trainer.ckpt_every=4"]
    straight, straight_losses = train_run(tmp_path / "straight", *common)
    train_run(tmp_path / "interrupted", *common)
    keep_only_checkpoint(tmp_path / "interrupted", 4)
    resumed, resumed_losses = train_run(
        tmp_path / "interrupted", *common, f"resume={tmp_path / 'interrupted'}"
    )
    assert resumed_losses[-4:] == straight_losses[-4:]
    assert resumed["val/loss"] == straight["val/loss"]
    assert resumed["perf/sim_tokens_per_s"] > 0
