"""Miner behaviours: every spec parses and acts as documented, alone and inside LocalPool; bad specs fail
listing the valid ones.

Legend: a assignments routed to one expert, A all assignments, D model width, E experts.
"""

from __future__ import annotations

import time

import pytest
import torch

from experts.behaviours import (
    HONEST,
    VALID_SPECS,
    Behaviour,
    CallContext,
    ExpertFailure,
    answer_call,
    low_rank_weights,
    parse_behaviour,
    parse_behaviours,
    run_expert,
    tiled_rows,
)
from experts.modules import FFN
from experts.owner import OptimizerSettings
from experts.pool import LocalPool
from moe.errors import ConfigError
from moe.nn.layer import combine
from router.plan import build_plan
from router.seeds import torch_generator

D = 8


@pytest.fixture
def expert() -> FFN:
    torch.manual_seed(0)
    return FFN(D, 16)


def call(step: int = 0, expert: int = 0, peer=None, seed: int = 0) -> CallContext:
    return CallContext(step, expert, torch_generator(seed, "behaviour", "layer0", step, expert), peer)


def inputs(rows: int = 5) -> torch.Tensor:
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("spec", "kind", "arg"),
    [
        ("honest", "honest", None),
        ("noisy:0.5", "noisy", 0.5),
        ("lazy", "lazy", None),
        ("stale:10", "stale", 10),
        ("adversarial", "adversarial", None),
        ("adversarial:3", "adversarial", 3),
        ("copycat:2", "copycat", 2),
        ("slow:25", "slow", 25),
        ("flaky:0.3", "flaky", 0.3),
        ("crash:7", "crash", 7),
        ("intermittent:20", "intermittent", 20),
        ("cheap:4", "cheap", 4),
        ("replay:0.5", "replay", 0.5),
        (" Noisy : 0.1 ", "noisy", 0.1),
    ],
)
def test_every_spec_parses(spec, kind, arg):
    behaviour = parse_behaviour(spec)
    assert behaviour == Behaviour(kind, arg)
    assert parse_behaviour(behaviour.spec) == behaviour  # the spec string round-trips


def test_unknown_spec_fails_listing_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        parse_behaviour("sneaky", expert=3)
    message = str(err.value)
    assert "sneaky" in message
    assert "expert 3" in message
    for spec in VALID_SPECS:
        assert spec in message


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("noisy", "needs an argument"),
        ("lazy:2", "takes no argument"),
        ("flaky:1.5", "p must be in [0, 1]"),
        ("noisy:-1", "σ must be >= 0"),
        ("crash:2.5", "s must be a step"),
        ("slow:fast", "not a number"),
        ("adversarial:0", "k must be > 0"),
        ("intermittent:0", "number of steps >= 1"),
        ("cheap", "needs an argument"),
        ("cheap:0", "r must be a rank >= 1"),
        ("cheap:2.5", "r must be a rank >= 1"),
        ("replay:1.5", "p must be in [0, 1]"),
        ("replay", "needs an argument"),
    ],
)
def test_bad_arguments_fail_saying_why(spec, says):
    with pytest.raises(ConfigError) as err:
        parse_behaviour(spec)
    assert says in str(err.value)


def test_behaviours_map_checks_indices_and_drops_honest_experts():
    assert parse_behaviours({2: "lazy", "3": "honest", 0: "crash:4"}, num_experts=4) == {
        2: Behaviour("lazy"),
        0: Behaviour("crash", 4),
    }
    assert parse_behaviours(None, 4) == {}
    with pytest.raises(ConfigError, match="valid indices: 0..3"):
        parse_behaviours({4: "lazy"}, num_experts=4)
    with pytest.raises(ConfigError, match="must be another expert"):
        parse_behaviours({1: "copycat:1"}, num_experts=4)
    with pytest.raises(ConfigError, match="must be another expert"):
        parse_behaviours({1: "copycat:9"}, num_experts=4)


def test_honest_returns_the_expert_output(expert):
    x_aD = inputs()
    assert torch.equal(run_expert(expert, HONEST, x_aD, call()), expert(x_aD))


def test_noisy_adds_seeded_gaussian_noise_and_still_learns(expert):
    x_aD = inputs(400)
    behaviour = parse_behaviour("noisy:0.5")
    y_aD = run_expert(expert, behaviour, x_aD, call(step=3))
    noise_aD = y_aD - expert(x_aD)
    assert abs(float(noise_aD.detach().std()) - 0.5) < 0.03
    assert torch.equal(
        y_aD, run_expert(expert, behaviour, x_aD, call(step=3))
    )  # same (seed, step): same draw
    assert not torch.equal(y_aD, run_expert(expert, behaviour, x_aD, call(step=4)))
    y_aD.sum().backward()
    assert expert.w_out.weight.grad is not None


def test_lazy_answers_zeros_without_computing():
    calls = []

    class Counting(torch.nn.Module):
        def forward(self, x_aD):
            calls.append(1)
            return x_aD

    y_aD = run_expert(Counting(), parse_behaviour("lazy"), inputs(), call())
    assert torch.equal(y_aD, torch.zeros(5, D))
    assert not y_aD.requires_grad
    assert calls == []


def test_adversarial_negates_and_passes_gradients_straight_through(expert):
    x_aD = inputs()
    y_aD = expert(x_aD)
    lie_aD = run_expert(expert, parse_behaviour("adversarial"), x_aD, call())
    assert torch.allclose(lie_aD, -y_aD)  # small outputs: under the norm cap
    lie_aD.sum().backward()
    straight = expert.w_out.weight.grad.clone()
    expert.zero_grad()
    expert(x_aD).sum().backward()
    assert torch.allclose(straight, expert.w_out.weight.grad)  # the owner learns as if it had been honest


def test_adversarial_scale_and_its_norm_cap(expert):
    x_aD = inputs()
    y_aD = expert(x_aD).detach()
    assert torch.allclose(run_expert(expert, parse_behaviour("adversarial:3"), x_aD, call()), -3 * y_aD)
    huge = run_expert(lambda x: 1e6 * x, parse_behaviour("adversarial:2"), x_aD, call())
    assert torch.allclose(huge.norm(dim=-1), 2 * x_aD.norm(dim=-1))


def test_copycat_returns_the_peers_answer_and_fails_without_one(expert):
    x_aD = inputs()
    peer_answer = torch.full((5, D), 7.0)
    y_aD = run_expert(expert, parse_behaviour("copycat:2"), x_aD, call(peer=lambda j, x: peer_answer * j))
    assert torch.equal(y_aD, 2 * peer_answer)
    with pytest.raises(ExpertFailure, match="not reachable"):
        run_expert(expert, parse_behaviour("copycat:2"), x_aD, call(peer=None))


def test_stale_stops_learning_at_its_step(expert):
    stale = parse_behaviour("stale:5")
    assert stale.learns_at(4)
    assert not stale.learns_at(5)
    assert not stale.learns_at(50)
    assert HONEST.learns_at(10**6)
    assert torch.equal(run_expert(expert, stale, inputs(), call(step=9)), expert(inputs()))


def test_slow_only_delays():
    slow = parse_behaviour("slow:250")
    assert slow.latency_ms == 250.0
    assert HONEST.latency_ms == 0.0


def test_flaky_fails_with_its_probability_reproducibly():
    outcomes = [_fails("flaky:0.3", step) for step in range(500)]
    assert abs(sum(outcomes) / len(outcomes) - 0.3) < 0.06
    assert outcomes == [_fails("flaky:0.3", step) for step in range(500)]
    assert not any(_fails("flaky:0", step) for step in range(50))
    assert all(_fails("flaky:1", step) for step in range(50))


def _fails(spec: str, step: int) -> bool:
    try:
        run_expert(torch.nn.Identity(), parse_behaviour(spec), torch.ones(1, D), call(step=step))
    except ExpertFailure:
        return True
    return False


def test_crash_fails_from_its_step_on():
    assert [_fails("crash:3", step) for step in range(6)] == [False, False, False, True, True, True]


def test_intermittent_alternates_honest_and_zero_answers(expert):
    intermittent = parse_behaviour("intermittent:3")
    zero = [not run_expert(expert, intermittent, inputs(), call(step=step)).any() for step in range(12)]
    assert zero == [False] * 3 + [True] * 3 + [False] * 3 + [True] * 3
    assert torch.equal(run_expert(expert, intermittent, inputs(), call(step=7)), expert(inputs()))


def test_cheap_answers_with_rank_r_weights_cached_per_version_and_learns(expert):
    x_aD = inputs()
    y_aD = run_expert(expert, parse_behaviour("cheap:2"), x_aD, call())
    reference_weights = {}
    for name, param in expert.named_parameters():
        u, s, vh = torch.linalg.svd(param.detach(), full_matrices=False)
        reference_weights[name] = (u[:, :2] * s[:2]) @ vh[:2]
    assert torch.allclose(y_aD, torch.func.functional_call(expert, reference_weights, (x_aD,)), atol=1e-5)
    assert not torch.allclose(y_aD, expert(x_aD), atol=1e-3)  # close to honest, but not honest
    cached = low_rank_weights(expert, 2)["w_in.weight"]
    assert low_rank_weights(expert, 2)["w_in.weight"] is cached  # same parameter version: cached
    y_aD.sum().backward()
    assert expert.w_in.weight.grad is not None  # straight through: the miner keeps learning
    with torch.no_grad():
        expert.w_in.weight.add_(1.0)  # an optimizer step bumps the version
    assert low_rank_weights(expert, 2)["w_in.weight"] is not cached
    full_rank = run_expert(expert, parse_behaviour("cheap:64"), x_aD, call())
    assert torch.allclose(full_rank, expert(x_aD), atol=1e-6)  # rank ≥ the matrix's: exact


def test_replay_answers_an_earlier_output_with_its_probability(expert):
    replay = parse_behaviour("replay:0.5")
    first = run_expert(expert, replay, inputs(5), call(step=0))  # nothing cached yet: computed
    assert torch.equal(first, expert(inputs(5)))
    replayed = []
    for step in range(1, 200):
        x_aD = torch.randn(3 + step % 5, D, generator=torch.Generator().manual_seed(step))
        y_aD = run_expert(expert, replay, x_aD, call(step=step))
        honest = expert(x_aD)
        replayed.append(not torch.allclose(y_aD, honest))
        assert y_aD.shape == x_aD.shape
    assert abs(sum(replayed) / len(replayed) - 0.5) < 0.1
    assert torch.equal(tiled_rows(torch.arange(6.0).reshape(3, 2), 5)[3:], torch.tensor([[0.0, 1], [2, 3]]))
    never = parse_behaviour("replay:0")
    assert torch.equal(run_expert(expert, never, inputs(7), call(step=3)), expert(inputs(7)))


def test_call_draws_depend_only_on_seed_layer_step_and_expert(expert):
    """Workers and LocalPool must draw the same numbers: `answer_call` seeds each call from
    (seed, layer, step, expert) through `router.seeds`, never from Python's salted `hash`."""
    noisy, x_aD = parse_behaviour("noisy:0.5"), inputs()

    def answer(seed=0, layer="layer1", step=12, expert_idx=4):
        with torch.no_grad():
            return answer_call(expert, noisy, x_aD, seed=seed, layer=layer, step=step, expert_idx=expert_idx)

    first = answer()
    assert torch.equal(first, answer())
    for changed in ({"seed": 1}, {"layer": "layer2"}, {"step": 13}, {"expert_idx": 5}):
        assert not torch.equal(first, answer(**changed)), changed


# ---------------------------------------------------------------------------------------------- in LocalPool


def pool_with(behaviours: dict[int, str], num_experts: int = 4, lr: float = 1e-2) -> LocalPool:
    torch.manual_seed(0)
    pool = LocalPool([FFN(D, 16) for _ in range(num_experts)], OptimizerSettings(lr=lr, grad_clip=0.0))
    pool.set_behaviours(parse_behaviours(behaviours, num_experts), seed=0, layer="layer0")
    return pool


def plan_for(expert_idx: list[int], num_experts: int = 4):
    """Token t goes to expert_idx[t] with gate 1, plus expert 0 with gate 1 for every token (top-2)."""
    num_tokens = len(expert_idx)
    tokens_A = torch.arange(num_tokens).repeat(2)
    experts_A = torch.cat([torch.tensor(expert_idx), torch.zeros(num_tokens, dtype=torch.long)])
    return build_plan(
        tokens_A,
        experts_A,
        torch.full((2 * num_tokens,), 0.5),
        num_tokens=num_tokens,
        num_experts=num_experts,
    )


def test_pool_reports_a_crashed_expert_as_not_answering_and_combine_stays_finite():
    pool = pool_with({1: "crash:2", 3: "crash:0"})
    plan = plan_for([1, 1, 2, 2])  # expert 3 has no tokens
    x_AD = torch.randn(plan.token_idx.numel(), D)
    assert pool(x_AD, plan, 1).answered_E.tolist() == [True, True, True, True]
    output = pool(x_AD, plan, 2)
    assert output.answered_E.tolist() == [True, False, True, True]  # no tokens: nothing to fail
    assert "crashed" in pool.last_failures[1]
    out_ND, weight_A = combine(output.y_AD, plan, output.answered_E)
    assert torch.isfinite(out_ND).all()
    # expert 0 takes the whole gate of the tokens whose other expert crashed, and only those
    assert torch.allclose(weight_A[plan.expert_idx == 0], torch.tensor([1.0, 1.0, 0.5, 0.5]))


def test_pool_runs_slow_experts_in_virtual_time():
    pool = pool_with({2: "slow:5000", 3: "slow:9000"})
    plan = plan_for([1, 2, 2, 1])  # the 9 s expert has no tokens: it is not waited for
    start = time.perf_counter()
    pool(torch.randn(plan.token_idx.numel(), D), plan)
    assert time.perf_counter() - start < 1.0
    assert pool.simulated_latency_ms == 5000.0


def test_pool_copycat_answers_with_the_copied_experts_output():
    pool = pool_with({2: "copycat:1"})
    plan = plan_for([2, 2, 1, 3])
    x_AD = torch.randn(plan.token_idx.numel(), D)
    y_AD = pool(x_AD, plan).y_AD
    rows = plan.expert_idx == 2
    assert torch.allclose(y_AD[rows], pool.experts[1](x_AD[rows]))


def test_stale_expert_stops_changing_after_its_step_while_others_learn():
    pool = pool_with({1: "stale:3"})
    plan = plan_for([1, 1, 2, 2])
    x_AD = torch.randn(plan.token_idx.numel(), D)
    snapshots = []
    for step in range(1, 7):
        pool(x_AD, plan, step).y_AD.square().sum().backward()
        pool.step(step)
        snapshots.append([e.w_out.weight.detach().clone() for e in pool.experts])
    changed = [
        [not torch.equal(a[e], b[e]) for e in range(4)]
        for a, b in zip(snapshots, snapshots[1:], strict=False)
    ]
    assert [c[1] for c in changed] == [True, False, False, False, False]  # steps 2 → 3 learn, 3 on do not
    assert all(c[2] for c in changed)  # an honest expert keeps learning


def test_behaviours_reach_the_pools_of_a_training_run(run_tiny):
    summary, run_dir = run_tiny(
        "data=clusters", "poi=taylor", "++experts.behaviours={1: crash:0, 2: slow:40}"
    )
    events = (run_dir / "metrics.jsonl").read_text()
    assert '"behaviours/layer0/simulated_latency_ms": 40.0' in events
    assert summary["poi/score/layer0/1"] < 0  # failed every step: the penalty, and nothing earned
