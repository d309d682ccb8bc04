"""The MoE layer against a dense reference: each token through its chosen experts, gate-weighted; and
what it offers a scorer: evidence of training steps, side passes that reuse and mask pool answers."""

from __future__ import annotations

import pytest
import torch

import router
from experts.modules import FFN
from experts.owner import OptimizerSettings
from experts.pool import LocalPool, PoolOutput
from moe.nn import scatter
from moe.nn.layer import MoELayer, combine
from router.plan import DispatchPlan, build_plan

D, F, E = 16, 32, 4


class CountingPool(LocalPool):
    """A local pool that counts its forwards."""

    calls = 0

    def forward(self, x_AD: torch.Tensor, plan: DispatchPlan, step: int = 0) -> PoolOutput:
        self.calls += 1
        return super().forward(x_AD, plan, step)


def make_layer(top_k: int = 2, activation: str = "gelu", seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    experts = [FFN(D, F, activation) for _ in range(E)]
    pool = CountingPool(experts, OptimizerSettings(lr=1e-2, grad_clip=0.0))
    return MoELayer("layer0", router.build("topk", D, E, top_k=top_k), pool)


def dense_reference(layer: MoELayer, x_ND: torch.Tensor) -> torch.Tensor:
    """Plain loop: for every assignment, run one token through one expert and add gate · output."""
    plan = layer.router(x_ND)
    out_ND = torch.zeros_like(x_ND)
    for token, expert, gate in zip(plan.token_idx.tolist(), plan.expert_idx.tolist(), plan.gate, strict=True):
        out_ND[token] = out_ND[token] + gate * layer.pool.experts[expert](x_ND[token : token + 1])[0]
    return out_ND


@pytest.mark.parametrize("sparse_min_elements", [0, 2**62], ids=["sparse", "plain"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_layer_matches_dense_reference_outputs_and_gradients(
    top_k, activation, sparse_min_elements, monkeypatch
):
    # a layer this small combines through the plain formula; a floor of 0 takes combine's sparse kernels
    monkeypatch.setattr(scatter, "SPARSE_MIN_ELEMENTS", sparse_min_elements)
    layer = make_layer(top_k, activation)
    x_BTD = torch.randn(3, 7, D, requires_grad=True)
    y_BTD, _ = layer(x_BTD)
    y_BTD.square().sum().backward()
    grads = [x_BTD.grad.clone()] + [p.grad.clone() for p in layer.pool.parameters()]
    grads += [layer.router.gate.weight.grad.clone()]

    x_BTD.grad = None
    layer.router.zero_grad()
    for p in layer.pool.parameters():
        p.grad = None
    ref_ND = dense_reference(layer, x_BTD.reshape(-1, D))
    ref_ND.square().sum().backward()
    ref_grads = [x_BTD.grad] + [p.grad for p in layer.pool.parameters()] + [layer.router.gate.weight.grad]

    torch.testing.assert_close(y_BTD.reshape(-1, D), ref_ND, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_failed_expert_is_masked_and_gates_renormalised():
    token_A = torch.tensor([0, 1, 0, 2])
    expert_A = torch.tensor([0, 0, 1, 1])
    gate_A = torch.tensor([0.6, 1.0, 0.4, 0.5])
    plan = build_plan(token_A, expert_A, gate_A, num_tokens=4, num_experts=2)
    y_AD = torch.arange(8.0).reshape(4, 2) + 1
    out_ND, _ = combine(y_AD, plan, answered_E=torch.tensor([True, False]))
    # token 0: expert 1 failed, expert 0 keeps the token's whole gate mass 0.6 + 0.4
    torch.testing.assert_close(out_ND[0], 1.0 * y_AD[0])
    torch.testing.assert_close(out_ND[1], 1.0 * y_AD[1])
    # token 2: its only expert failed -> zero (residual only); token 3: no expert at all -> zero
    assert torch.equal(out_ND[2], torch.zeros(2))
    assert torch.equal(out_ND[3], torch.zeros(2))
    assert torch.isfinite(out_ND).all()


def test_all_answered_keeps_gates_exactly():
    plan = build_plan(
        torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([0.3, 0.2]), num_tokens=1, num_experts=2
    )
    out_ND, weight_A = combine(torch.ones(2, 3), plan, torch.tensor([True, True]))
    assert torch.equal(weight_A, plan.gate)
    torch.testing.assert_close(out_ND, torch.full((1, 3), 0.5))


def test_expert_parameters_are_stepped_by_their_owner_only():
    layer = make_layer()
    trunk_params = {id(p) for p in layer.parameters()}
    expert_params = list(layer.pool.parameters())
    assert not trunk_params & {id(p) for p in expert_params}, "experts must not be trunk parameters"
    before = [p.detach().clone() for p in expert_params]
    y_BTD, _ = layer(torch.randn(2, 5, D))
    y_BTD.sum().backward()
    layer.pool.step(0)
    changed = [not torch.equal(b, p) for b, p in zip(before, expert_params, strict=True)]
    used_E = layer.last_plan.counts > 0
    assert any(changed)
    assert all(p.grad is None for p in expert_params), "owner step zeroes gradients"
    for e, expert in enumerate(layer.pool.experts):
        moved = any(
            not torch.equal(b, p)
            for b, p in zip(before, expert_params, strict=True)
            if any(p is q for q in expert.parameters())
        )
        assert moved == bool(used_E[e])


def test_plan_metrics_describe_load():
    plan = build_plan(
        torch.arange(6),
        torch.tensor([0, 0, 0, 0, 1, 1]),
        torch.ones(6),
        num_tokens=6,
        num_experts=3,
        dropped_X=torch.tensor([5, 5]),
    )
    assert plan.counts.tolist() == [4, 2, 0]
    torch.testing.assert_close(plan.metrics["max_vio"], torch.tensor(4 / 2 - 1))
    assert plan.metrics["unused_experts"].item() == 1
    torch.testing.assert_close(plan.metrics["dropped_frac"], torch.tensor(2 / 8))


def test_evidence_is_recorded_once_asked_and_only_with_gradients():
    layer = make_layer()
    x_BTD = torch.randn(2, 5, D, requires_grad=True)
    layer(x_BTD)
    assert layer.evidence is None
    layer.record_evidence()
    with torch.no_grad():
        layer(x_BTD)
    assert layer.evidence is None
    y_BTD, _ = layer(x_BTD)
    evidence = layer.evidence
    assert evidence.plan is layer.last_plan
    assert evidence.gated_AD.shape == (evidence.plan.token_idx.numel(), D)
    assert evidence.grad_out_ND is None
    y_BTD.sum().backward()
    torch.testing.assert_close(evidence.grad_out_ND, torch.ones(10, D))


def test_side_pass_leaves_the_training_trace_and_reuses_the_first_pool_answer():
    layer = make_layer()
    layer.record_evidence()
    x_BTD = torch.randn(2, 5, D)
    layer(x_BTD)
    plan, evidence, calls = layer.last_plan, layer.evidence, layer.pool.calls
    with layer.side_pass() as side:
        first_BTD, _ = layer(x_BTD)
        first_counts_E = side.evidence.plan.counts
        again_BTD, _ = layer(x_BTD)
        assert layer.pool.calls == calls + 1  # the same inputs: the first answer again
        layer(x_BTD + 1)
        assert layer.pool.calls == calls + 2
    assert layer.last_plan is plan
    assert layer.evidence is evidence
    assert side.evidence is not None
    assert side.evidence is not evidence
    torch.testing.assert_close(first_BTD, again_BTD)
    failed_E, had_tokens_E = side.unmasked_answers()
    assert not failed_E.any()
    assert torch.equal(had_tokens_E, first_counts_E > 0)


def test_masking_an_expert_is_the_same_as_its_failure():
    layer = make_layer()
    x_BTD = torch.randn(2, 5, D)
    keep_E = torch.tensor([True, False, True, True])
    with torch.no_grad(), layer.side_pass() as side:
        full_BTD, _ = layer(x_BTD)
        with side.masking(keep_E):
            masked_BTD, _ = layer(x_BTD)
        unmasked_BTD, _ = layer(x_BTD)
    plan = layer.router(x_BTD.reshape(-1, D), selection_bias_E=layer.selection_bias_E)
    with torch.no_grad():
        y_AD = layer.pool(x_BTD.reshape(-1, D).index_select(0, plan.token_idx), plan, 0).y_AD
        failed_ND, _ = combine(y_AD, plan, keep_E)
    torch.testing.assert_close(masked_BTD.reshape(-1, D), failed_ND)
    torch.testing.assert_close(unmasked_BTD, full_BTD)
    assert not torch.allclose(masked_BTD, full_BTD)


def test_selection_bias_moves_selection():
    layer = make_layer(top_k=1)
    x_BTD = torch.randn(4, 8, D)
    layer.set_selection_bias(torch.tensor([0.0, 0.0, 0.0, 1.0e4]))
    layer(x_BTD)
    assert layer.last_plan.counts.tolist() == [0, 0, 0, 32]


@pytest.mark.parametrize("strategy", ["expert_choice", "switch"])
def test_sequences_routed_alone_equal_one_forward_per_sequence(strategy):
    """Inside `sequences_routed_alone` a batch gives what each of its sequences gives as a batch of one,
    in one pool call; outside, a batch-level router lets the sequences change each other's routing."""
    torch.manual_seed(0)
    experts = [FFN(D, F, "gelu") for _ in range(E)]
    pool = CountingPool(experts, OptimizerSettings(lr=1e-2, grad_clip=0.0))
    options = {"capacity_factor": 0.5, "eval_capacity_factor": 0.5} if strategy == "switch" else {}
    layer = MoELayer("layer0", router.build(strategy, D, E, **options), pool).eval()
    x_BTD = torch.randn(3, 7, D)
    ids_BT = torch.randint(0, 256, (3, 7))
    with torch.no_grad():
        alone_BTD = torch.cat([layer(x_BTD[b : b + 1], ids_BT[b : b + 1])[0] for b in range(3)])
        together_BTD, _ = layer(x_BTD, ids_BT)
        pool.calls = 0
        with layer.sequences_routed_alone():
            routed_alone_BTD, _ = layer(x_BTD, ids_BT)
    assert pool.calls == 1
    assert torch.allclose(routed_alone_BTD, alone_BTD, atol=1e-6)
    assert not torch.allclose(together_BTD, alone_BTD, atol=1e-3)
    assert layer.last_plan.num_tokens == 21


def test_selection_bias_terms_sum_and_travel_with_the_layer_state():
    layer = make_layer(top_k=1)
    poi_E, market_E = torch.tensor([0.5, -1.0, 0.0, 2.0]), torch.tensor([-0.25, 0.5, 1.0, -3.0])
    layer.set_selection_bias(poi_E)  # PoI's calls, as before: term "poi"
    assert torch.equal(layer.selection_bias_E, poi_E)
    layer.set_selection_bias(market_E, term="market")
    torch.testing.assert_close(layer.selection_bias_E, poi_E + market_E)
    layer.set_selection_bias(torch.zeros(E))
    assert torch.equal(layer.selection_bias_E, market_E)  # a new PoI bias replaces only PoI's term
    resumed = make_layer(top_k=1)
    resumed.load_state_dict(layer.state_dict())
    assert torch.equal(resumed.selection_bias_E, market_E)
    resumed.set_selection_bias(poi_E)  # the market term came back with the state
    torch.testing.assert_close(resumed.selection_bias_E, poi_E + market_E)


def test_a_checkpoint_from_before_bias_terms_loads_its_bias_as_the_poi_term():
    layer = make_layer(top_k=1)
    layer.set_selection_bias(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    old_state = {k: v for k, v in layer.state_dict().items() if not k.endswith("_extra_state")}
    resumed = make_layer(top_k=1)
    resumed.load_state_dict(old_state)
    assert torch.equal(resumed.selection_bias_E, layer.selection_bias_E)
    resumed.set_selection_bias(torch.ones(E), term="market")
    torch.testing.assert_close(resumed.selection_bias_E, layer.selection_bias_E + 1)
