"""Routing strategies: the DispatchPlan contract for every registered strategy, and each strategy against
a reference (exhaustive top-k, plain-loop capacity, brute-force and greedy balanced assignments, ...).

Legend: N tokens, D model width, E experts, K choices per token, A assignments.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import router
from experts.modules import FFN
from experts.pool import LocalPool
from moe.errors import ConfigError
from moe.nn.layer import MoELayer
from router.common import LearnedRouter
from router.plan import DispatchPlan

D, E, VOCAB = 8, 4, 256
ALL = router.names()
LEARNED = [name for name in ALL if issubclass(router.lookup(name).factory, LearnedRouter)]
TOKEN_CHOICE = [name for name in LEARNED if name != "expert_choice"]  # each token picks its experts
SMALL = settings(max_examples=12, deadline=None)


def make_router(name: str, num_experts: int = E, d_model: int = D, seed: int = 0, **options):
    torch.manual_seed(seed)
    return router.build(name, d_model, num_experts, **options)


def make_tokens(num_tokens: int, d_model: int = D, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x_ND = torch.randn(num_tokens, d_model, generator=generator)
    ids_N = torch.randint(0, VOCAB, (num_tokens,), generator=generator)
    return x_ND, ids_N


def route(name: str, num_tokens: int, num_experts: int = E, training: bool = True, seed: int = 0, **options):
    module = make_router(name, num_experts, seed=seed, **options).train(training)
    x_ND, ids_N = make_tokens(num_tokens, seed=seed)
    return module(x_ND, ids_N), module, x_ND


def assert_valid_plan(plan: DispatchPlan, num_tokens: int, num_experts: int) -> None:
    assert plan.num_tokens == num_tokens
    assert plan.counts.shape == (num_experts,)
    assert plan.token_idx.dtype == plan.expert_idx.dtype == plan.dropped.dtype == torch.long
    assert bool((plan.expert_idx[1:] >= plan.expert_idx[:-1]).all()), "assignments not sorted by expert"
    assert torch.equal(plan.counts, torch.bincount(plan.expert_idx, minlength=num_experts))
    assert int(plan.counts.sum()) == plan.token_idx.numel() == plan.gate.numel()
    assert bool(torch.isfinite(plan.gate).all())
    assert bool((plan.gate >= 0).all())
    for indices in (plan.token_idx, plan.dropped):
        assert bool(((indices >= 0) & (indices < num_tokens)).all())
    pairs = list(zip(plan.token_idx.tolist(), plan.expert_idx.tolist(), strict=True))
    assert len(set(pairs)) == len(pairs), "a token is sent to the same expert twice"
    assert {"load_cv", "max_vio", "dropped_frac", "unused_experts"} <= set(plan.metrics)


def kept_pairs(plan: DispatchPlan) -> set[tuple[int, int]]:
    return set(zip(plan.token_idx.tolist(), plan.expert_idx.tolist(), strict=True))


def experts_of_tokens(plan: DispatchPlan) -> dict[int, frozenset[int]]:
    chosen: dict[int, set[int]] = {}
    for token, expert in zip(plan.token_idx.tolist(), plan.expert_idx.tolist(), strict=True):
        chosen.setdefault(token, set()).add(expert)
    return {token: frozenset(experts) for token, experts in chosen.items()}


def gate_of(plan: DispatchPlan) -> dict[tuple[int, int], float]:
    return dict(
        zip(
            zip(plan.token_idx.tolist(), plan.expert_idx.tolist(), strict=True),
            plan.gate.tolist(),
            strict=True,
        )
    )


# ---------------------------------------------------------------------------------------------- every strategy


@pytest.mark.parametrize("name", ALL)
@SMALL
@given(
    num_tokens=st.integers(1, 80),
    num_experts=st.integers(2, 9),
    training=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_every_strategy_returns_a_valid_plan(name, num_tokens, num_experts, training, seed):
    plan, _, _ = route(name, num_tokens, num_experts, training, seed)
    assert_valid_plan(plan, num_tokens, num_experts)


@pytest.mark.parametrize("name", ALL)
def test_every_strategy_is_deterministic_for_a_seed_and_resumes_from_its_state(name):
    x_ND, ids_N = make_tokens(48)
    first, second = make_router(name, seed=3), make_router(name, seed=3)
    for _ in range(2):
        plan_a, plan_b = first(x_ND, ids_N), second(x_ND, ids_N)
        assert torch.equal(plan_a.token_idx, plan_b.token_idx)
        assert torch.equal(plan_a.gate, plan_b.gate)
    resumed = make_router(name, seed=99)
    resumed.load_state_dict(first.state_dict())
    plan_a, plan_c = first(x_ND, ids_N), resumed(x_ND, ids_N)
    assert torch.equal(plan_a.token_idx, plan_c.token_idx)
    assert torch.equal(plan_a.expert_idx, plan_c.expert_idx)
    assert torch.equal(plan_a.gate, plan_c.gate)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("training", [True, False])
def test_moe_layer_equals_dense_reference(name, training):
    """Layer output (and the router's gradient) equals Σ_e G[:, e]·f_e(x) with G the plan's dense gates."""
    torch.manual_seed(0)
    layer = MoELayer("layer0", make_router(name), LocalPool([FFN(D, 16) for _ in range(E)])).train(training)
    x_ND, ids_N = make_tokens(24)
    y_BTD, _ = layer(x_ND[None], ids_N[None])
    plan = layer.last_plan
    gates_NE = torch.zeros(24, E).index_put((plan.token_idx, plan.expert_idx), plan.gate, accumulate=True)
    dense_ND = sum(gates_NE[:, e : e + 1] * layer.pool.experts[e](x_ND) for e in range(E))
    torch.testing.assert_close(y_BTD[0], dense_ND, atol=1e-5, rtol=1e-5)
    if name in LEARNED:
        (router_grad,) = torch.autograd.grad(
            y_BTD.square().sum(), layer.router.gate.weight, retain_graph=True
        )
        (dense_grad,) = torch.autograd.grad(dense_ND.square().sum(), layer.router.gate.weight)
        torch.testing.assert_close(router_grad, dense_grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", LEARNED)
def test_router_math_stays_fp32_under_bf16_autocast(name):
    module = make_router(name)
    x_ND, ids_N = make_tokens(32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_NE = module.logits(x_ND.bfloat16())
        plan = module(x_ND.bfloat16(), ids_N)
    assert logits_NE.dtype == plan.gate.dtype == torch.float32
    torch.testing.assert_close(logits_NE, module.logits(x_ND.bfloat16().float()))


@pytest.mark.parametrize("name", LEARNED)
def test_gradients_reach_the_router_through_the_gates(name):
    torch.manual_seed(0)
    layer = MoELayer("layer0", make_router(name), LocalPool([FFN(D, 16) for _ in range(E)])).train()
    x_ND, ids_N = make_tokens(32)
    y_BTD, _ = layer(x_ND[None], ids_N[None])
    y_BTD.square().sum().backward()  # no aux loss: the gradient can only come through the gate values
    grad = layer.router.gate.weight.grad
    assert grad is not None
    assert bool(torch.isfinite(grad).all())
    assert float(grad.abs().sum()) > 0


@pytest.mark.parametrize("name", LEARNED)
def test_z_loss_shrinks_router_logits_on_a_toy_run(name):
    x_ND, ids_N = make_tokens(64)
    target_ND = torch.tanh(x_ND.roll(1, dims=-1))

    def logit_norms(z_loss_weight: float) -> tuple[float, float]:
        torch.manual_seed(0)
        module = router.build(name, D, E, z_loss_weight=z_loss_weight).train()
        with torch.no_grad():
            module.gate.weight.mul_(4.0)  # start with large logits: something for the z-loss to fix
        layer = MoELayer("layer0", module, LocalPool([FFN(D, 16) for _ in range(E)]))
        optimizer = torch.optim.Adam(module.parameters(), lr=3e-2)
        start = float(module.logits(x_ND).detach().norm())
        for _ in range(25):
            y_BTD, aux = layer(x_ND[None], ids_N[None])
            loss = (y_BTD[0] - target_ND).square().mean() + sum(aux.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return start, float(module.logits(x_ND).detach().norm())

    start, without_z = logit_norms(0.0)
    _, with_z = logit_norms(0.05)
    assert with_z < 0.9 * min(start, without_z)


@pytest.mark.parametrize("name", TOKEN_CHOICE)
def test_selection_bias_never_changes_the_gates_of_chosen_experts(name):
    plan_plain, module, x_ND = route(name, 64, training=False)
    bias_E = torch.tensor([0.8, 0.0, -0.3, -0.8]) * float(module.logits(x_ND).detach().std())
    plan_biased = module(x_ND, selection_bias_E=bias_E)
    chosen_plain, chosen_biased = experts_of_tokens(plan_plain), experts_of_tokens(plan_biased)
    unchanged = [t for t in chosen_plain if chosen_biased.get(t) == chosen_plain[t]]
    assert 0 < len(unchanged) < 64, "the bias should move some tokens but not all"
    gates_plain, gates_biased = gate_of(plan_plain), gate_of(plan_biased)
    for token in unchanged:
        for expert in chosen_plain[token]:
            assert gates_biased[token, expert] == pytest.approx(gates_plain[token, expert], abs=1e-7)


@pytest.mark.parametrize("name", LEARNED)
def test_a_banned_expert_gets_no_tokens_at_evaluation(name):
    _, module, x_ND = route(name, 64, training=False)
    plan = module(x_ND, selection_bias_E=torch.tensor([0.0, 0.0, 0.0, -math.inf]))
    assert int(plan.counts[-1]) == 0


def test_only_expert_choice_is_flagged_non_causal_at_evaluation():
    """Per-mode behaviour is checked in test_causality.py; at evaluation only expert choice looks ahead."""
    flagged = [name for name in ALL if not router.build(name, D, E).eval().is_causal()]
    assert flagged == ["expert_choice"]


def test_routers_without_a_gate_refuse_router_losses():
    for name in ("hash", "random"):
        with pytest.raises(ConfigError, match="z_loss_weight"):
            router.build(name, D, E, z_loss_weight=1e-3)


# ---------------------------------------------------------------------------------------------- top-k


@SMALL
@given(num_tokens=st.integers(1, 30), num_experts=st.integers(2, 7), data=st.data())
def test_topk_selection_equals_exhaustive_reference(num_tokens, num_experts, data):
    top_k = data.draw(st.integers(1, num_experts))
    bias_E = torch.tensor(data.draw(st.lists(st.floats(-1, 1), min_size=num_experts, max_size=num_experts)))
    module = make_router("topk", num_experts, top_k=top_k).eval()
    x_ND, _ = make_tokens(num_tokens, seed=data.draw(st.integers(0, 999)))
    plan = module(x_ND, selection_bias_E=bias_E)
    logits_NE = module.logits(x_ND).detach()
    key_NE, probs_NE = logits_NE + bias_E, logits_NE.softmax(-1)
    chosen = experts_of_tokens(plan)
    for token in range(num_tokens):
        best = max(
            itertools.combinations(range(num_experts), top_k), key=lambda s: sum(key_NE[token, list(s)])
        )
        assert chosen[token] == frozenset(best)
        mass = sum(float(probs_NE[token, e]) for e in best)
        for expert in best:
            assert gate_of(plan)[token, expert] == pytest.approx(
                float(probs_NE[token, expert]) / mass, rel=1e-5
            )


def test_topk_noise_is_training_only_and_learned_noise_gets_gradients():
    module = make_router("topk", learned_noise=True, noise_std=0.5)
    x_ND, _ = make_tokens(64)
    clean = experts_of_tokens(module.eval()(x_ND))
    assert clean == experts_of_tokens(module(x_ND))
    noisy_plan = module.train()(x_ND)
    assert experts_of_tokens(noisy_plan) != clean
    noisy_plan.gate.sum().backward()
    assert float(module.noise_gate.weight.grad.abs().sum()) > 0


# ---------------------------------------------------------------------------------------------- capacity


def capacity_reference(
    wanted: list[list[int | None]], capacity: int, group_of_token: list[int], token_order: bool = False
):
    """Plain loop: choice rank by choice rank, token by token (GShard's paper order; token by token when
    `token_order`); a choice fits while its bucket has room."""
    used: Counter = Counter()
    kept, dropped = set(), []
    ranks, tokens = range(len(wanted[0])), range(len(wanted))
    order = (
        [(t, r) for t in tokens for r in ranks] if token_order else [(t, r) for r in ranks for t in tokens]
    )
    for token, rank in order:
        expert = wanted[token][rank]
        if expert is None:
            continue
        bucket = (group_of_token[token], expert)
        if used[bucket] < capacity:
            used[bucket] += 1
            kept.add((token, expert))
        else:
            dropped.append(token)
    return kept, sorted(dropped)


def expected_capacity(num_tokens: int, num_experts: int, factor: float, k: int = 1) -> int:
    return min(num_tokens, max(1, math.ceil(factor * k * num_tokens / num_experts)))


@SMALL
@given(
    num_tokens=st.integers(1, 80),
    num_experts=st.integers(2, 8),
    factor=st.floats(0.25, 2.0),
    training=st.booleans(),
)
def test_switch_never_exceeds_capacity_and_drops_exactly_the_overflow(
    num_tokens, num_experts, factor, training
):
    plan, module, x_ND = route(
        "switch", num_tokens, num_experts, training, capacity_factor=factor, eval_capacity_factor=factor
    )
    capacity = expected_capacity(num_tokens, num_experts, factor)
    assert int(plan.counts.max()) <= capacity
    choices = module.logits(x_ND).argmax(-1).tolist()
    kept, dropped = capacity_reference([[e] for e in choices], capacity, [0] * num_tokens)
    assert kept_pairs(plan) == kept
    assert sorted(plan.dropped.tolist()) == dropped
    assert float(plan.metrics["dropped_frac"]) == pytest.approx(len(dropped) / num_tokens)


def test_switch_jitter_only_changes_routing_while_training():
    x_ND, _ = make_tokens(256)
    jittery = make_router("switch", jitter_eps=0.5, eval_capacity_factor=8.0, capacity_factor=8.0)
    steady = make_router("switch", eval_capacity_factor=8.0, capacity_factor=8.0)
    assert experts_of_tokens(jittery.eval()(x_ND)) == experts_of_tokens(steady.eval()(x_ND))
    assert experts_of_tokens(jittery.train()(x_ND)) != experts_of_tokens(steady.train()(x_ND))


GSHARD_CASES = {  # token count, experts, capacity factor and group size that gshard's tests draw from
    "num_tokens": st.integers(1, 80),
    "num_experts": st.integers(2, 8),
    "factor": st.floats(0.25, 1.5),
    "group_size": st.integers(1, 40),
}


@pytest.mark.parametrize("order", ["paper", "causal"])
@SMALL
@given(**GSHARD_CASES)
def test_gshard_serves_slots_in_its_order_and_drops_exactly_the_overflow(
    order, num_tokens, num_experts, factor, group_size
):
    """Paper order: every first choice before any second; causal order: token by token."""
    plan, module, x_ND = route(
        "gshard",
        num_tokens,
        num_experts,
        training=False,
        eval_capacity_factor=factor,
        group_size=group_size,
        order=order,
    )
    size = min(group_size, num_tokens)
    capacity = expected_capacity(size, num_experts, factor, k=2)
    top2 = module.logits(x_ND).topk(2, dim=-1).indices.tolist()
    groups = [t // size for t in range(num_tokens)]
    kept, dropped = capacity_reference(top2, capacity, groups, token_order=order == "causal")
    assert kept_pairs(plan) == kept
    assert sorted(plan.dropped.tolist()) == dropped


@pytest.mark.parametrize("order", ["paper", "causal"])
@SMALL
@given(**GSHARD_CASES, seed=st.integers(0, 99))
def test_gshard_training_never_exceeds_group_capacity(
    order, num_tokens, num_experts, factor, group_size, seed
):
    plan, module, x_ND = route(
        "gshard",
        num_tokens,
        num_experts,
        training=True,
        seed=seed,
        capacity_factor=factor,
        group_size=group_size,
        order=order,
    )
    size = min(group_size, num_tokens)
    capacity = expected_capacity(size, num_experts, factor, k=2)
    load = Counter((t // size, e) for t, e in kept_pairs(plan))
    assert max(load.values()) <= capacity
    first = module.logits(x_ND).argmax(-1).tolist()
    for token in plan.dropped.tolist():  # a choice is only dropped from a full buffer
        experts_kept = experts_of_tokens(plan).get(token, frozenset())
        lost = [e for e in module.logits(x_ND).topk(2).indices[token].tolist() if e not in experts_kept]
        assert any(load[token // size, e] == capacity for e in lost)
    for token in range(num_tokens):  # first choices are always wanted: kept or dropped, never discarded
        assert (token, first[token]) in kept_pairs(plan) or token in plan.dropped.tolist()


def test_gshard_keeps_the_second_expert_with_probability_two_g2():
    plan, module, x_ND = route("gshard", 4000, training=True, capacity_factor=8.0, group_size=4000)
    probs_N2 = module.logits(x_ND).detach().softmax(-1).topk(2).values
    g2_N = probs_N2[:, 1] / probs_N2.sum(-1)
    expected = float((2 * g2_N).clamp(max=1).sum())
    assert plan.dropped.numel() == 0
    assert plan.token_idx.numel() - 4000 == pytest.approx(expected, rel=0.05)


# ---------------------------------------------------------------------------------------------- balanced


@SMALL
@given(num_tokens=st.integers(1, 80), num_experts=st.integers(1, 9), factor=st.floats(0.5, 3.0))
def test_expert_choice_gives_every_expert_exactly_c_tokens(num_tokens, num_experts, factor):
    plan, _, _ = route("expert_choice", num_tokens, num_experts, capacity_factor=factor)
    capacity = expected_capacity(num_tokens, num_experts, factor)
    assert plan.counts.tolist() == [capacity] * num_experts
    unrouted = 1 - len(set(plan.token_idx.tolist())) / num_tokens
    assert float(plan.metrics["unrouted_frac"]) == pytest.approx(unrouted, abs=1e-6)  # an fp32 ratio


def greedy_balanced(score_NE: torch.Tensor) -> list[int]:
    """Token by token, the best expert that still has room (capacity N/E)."""
    num_tokens, num_experts = score_NE.shape
    room = [num_tokens // num_experts] * num_experts
    chosen = []
    for token in range(num_tokens):
        expert = max((e for e in range(num_experts) if room[e] > 0), key=lambda e: float(score_NE[token, e]))
        room[expert] -= 1
        chosen.append(expert)
    return chosen


def total_score(score_NE: torch.Tensor, plan: DispatchPlan) -> float:
    return float(score_NE[plan.token_idx, plan.expert_idx].sum())


@SMALL
@given(tokens_per_expert=st.integers(1, 12), num_experts=st.integers(1, 8), seed=st.integers(0, 999))
def test_base_gives_every_expert_exactly_n_over_e_and_beats_greedy(tokens_per_expert, num_experts, seed):
    num_tokens = tokens_per_expert * num_experts
    plan, module, x_ND = route("base", num_tokens, num_experts, training=True, seed=seed)
    assert plan.counts.tolist() == [tokens_per_expert] * num_experts
    score_NE = module.logits(x_ND).detach()
    greedy = float(score_NE[torch.arange(num_tokens), greedy_balanced(score_NE)].sum())
    slack = num_tokens * module.config.auction_epsilon * float(score_NE.max() - score_NE.min())
    assert total_score(score_NE, plan) >= greedy - slack


@pytest.mark.parametrize("seed", range(5))
def test_base_is_within_the_auction_gap_of_the_brute_force_optimum(seed):
    plan, module, x_ND = route("base", 8, num_experts=2, training=True, seed=seed)
    score_NE = module.logits(x_ND).detach()
    optimum = max(
        float(score_NE[torch.arange(8), list(assignment)].sum())
        for assignment in set(itertools.permutations([0] * 4 + [1] * 4))
    )
    slack = 8 * module.config.auction_epsilon * float(score_NE.max() - score_NE.min())
    assert total_score(score_NE, plan) >= optimum - slack


def test_base_balances_within_one_when_experts_do_not_divide_tokens_and_is_greedy_at_eval():
    plan, module, x_ND = route("base", 50, num_experts=7, training=True)
    assert int(plan.counts.max() - plan.counts.min()) <= 1
    assert int(plan.counts.sum()) == 50
    eval_plan = module.eval()(x_ND)
    assert experts_of_tokens(eval_plan) == {
        t: frozenset([e]) for t, e in enumerate(module.logits(x_ND).argmax(-1).tolist())
    }


def test_base_stays_balanced_when_the_auction_is_cut_short(caplog):
    with caplog.at_level(logging.DEBUG, logger="router.base_layers"):
        plan, _, _ = route("base", 64, num_experts=8, training=True, auction_phase_rounds=1)
    assert plan.counts.tolist() == [8] * 8
    assert "take the open slots greedily" in caplog.text


def test_sinkhorn_balances_skewed_logits_while_training():
    module = make_router("sinkhorn", num_experts=8)
    x_ND, _ = make_tokens(512)
    x_ND = x_ND + 2.0 * module.gate.weight[0].detach()  # most tokens prefer expert 0
    balanced = module.train()(x_ND)
    plain = module.eval()(x_ND)
    assert float(balanced.metrics["max_vio"]) < 0.5 * float(plain.metrics["max_vio"])


# ---------------------------------------------------------------------------------------------- fixed routers


def test_hash_is_a_fixed_balanced_function_of_token_ids():
    module = make_router("hash", num_experts=5)
    x_ND, ids_N = make_tokens(200)
    plan = module(x_ND, ids_N)
    expert_of_token = dict(zip(plan.token_idx.tolist(), plan.expert_idx.tolist(), strict=True))
    other_x_ND = torch.randn_like(x_ND)
    again = make_router("hash", num_experts=5, seed=123)(other_x_ND, ids_N)  # same config, new module
    assert experts_of_tokens(again) == experts_of_tokens(plan)
    for token, token_id in enumerate(ids_N.tolist()):
        assert expert_of_token[token] == int(module.expert_of_id_Y[token_id])
    owned_E = torch.bincount(module.expert_of_id_Y, minlength=5)
    assert int(owned_E.max() - owned_E.min()) <= 1
    assert list(module.state_dict()) == []  # nothing learned, nothing to checkpoint


def test_hash_needs_token_ids_in_the_vocabulary():
    module = make_router("hash")
    x_ND, _ = make_tokens(4)
    with pytest.raises(ConfigError, match="token id"):
        module(x_ND)
    with pytest.raises(ValueError, match="vocab_size"):
        module(x_ND, torch.tensor([0, 1, 2, VOCAB]))


def test_random_is_uniform_fresh_each_training_step_and_fixed_at_eval():
    module = make_router("random", num_experts=4, top_k=2)
    x_ND, _ = make_tokens(4000)
    first, second = module(x_ND), module(x_ND)
    assert experts_of_tokens(first) != experts_of_tokens(second)
    assert float(first.counts.float().std() / first.counts.float().mean()) < 0.05
    assert torch.allclose(first.gate, torch.full_like(first.gate, 0.5))
    module.eval()
    assert experts_of_tokens(module(x_ND)) == experts_of_tokens(module(x_ND))


# ---------------------------------------------------------------------------------------------- bias balancing


def test_bias_balanced_moves_each_bias_the_right_way_and_lowers_max_vio():
    module = make_router("bias_balanced", num_experts=8, top_k=2, bias_update_rate=0.02).train()
    x_ND, _ = make_tokens(512)
    x_ND = x_ND + 1.5 * module.gate.weight[0].detach()  # skewed: most tokens prefer expert 0
    first = module(x_ND)
    load_E = first.counts.float()
    moved_E = module.expert_bias_E
    assert bool((moved_E[load_E > load_E.mean()] < 0).all())
    assert bool((moved_E[load_E < load_E.mean()] > 0).all())
    for _ in range(150):
        last = module(x_ND)
    assert float(last.metrics["max_vio"]) < 0.5 * float(first.metrics["max_vio"])
    assert "expert_bias_E" in module.state_dict()
