"""The balancing routers keep their papers' promise: `bias_balanced` balances within a few hundred steps,
counts only its own bias's load (PoI's selection bias keeps its effect), freezes for banned experts;
`sinkhorn`'s default temperature makes the argmax, not only the soft matrix, balanced.

Legend: N tokens, D model width, E experts, K choices per token.
"""

from __future__ import annotations

import logging

import pytest
import torch

import router
from moe.engine.metrics import read_metrics
from moe.incentives.poi import BAN_BIAS
from router.bias_balanced import BANNED_BELOW, BiasBalancedConfig
from router.common import sinkhorn_expert_offsets
from router.sinkhorn import SinkhornConfig
from tests.helpers import compose

D, E = 16, 8


def load_cv(counts_E: torch.Tensor) -> float:
    load_E = counts_E.float()
    return float(load_E.std(unbiased=False) / load_E.mean())


def skewed_router(name: str = "bias_balanced", num_tokens: int = 1024, seed: int = 0, **options):
    """A router and tokens most of which prefer expert 0 (plain top-2 load CV ≈ 0.85)."""
    torch.manual_seed(seed)
    module = router.build(name, D, E, **options).train()
    x_ND = torch.randn(num_tokens, D, generator=torch.Generator().manual_seed(seed))
    return module, x_ND + 2.0 * module.gate.weight[0].detach()


def run_steps(module, x_ND: torch.Tensor, steps: int, selection_bias_E: torch.Tensor | None = None):
    """(per-step counts [steps, E], per-step expert_bias_E after the step [steps, E])."""
    counts, biases = [], []
    for _ in range(steps):
        counts.append(module(x_ND, None, selection_bias_E).counts)
        biases.append(module.expert_bias_E.clone())
    return torch.stack(counts), torch.stack(biases)


# ---------------------------------------------------------------------------------------------- bias_balanced


def test_default_rate_balances_a_skewed_router_within_a_few_hundred_steps():
    module, x_ND = skewed_router()
    first = module(x_ND).counts
    counts_SE, _ = run_steps(module, x_ND, 300)
    assert load_cv(first) > 0.6, "the router must start skewed, or the test shows nothing"
    assert load_cv(counts_SE[-50:].sum(0)) < 0.1
    assert load_cv(counts_SE[-1]) < 0.2


def test_the_old_rate_could_not_balance_in_a_few_hundred_steps():
    """The control for the default: the paper's 1e-3 (meant for ~10^5 steps) leaves the same router skewed."""
    module, x_ND = skewed_router(bias_update_rate=1e-3)
    counts_SE, _ = run_steps(module, x_ND, 300)
    assert load_cv(counts_SE[-50:].sum(0)) > 0.3
    assert BiasBalancedConfig().bias_update_rate >= 1e-2


def test_bias_update_ignores_the_selection_bias():
    """A constant selection bias on expert 3 changes which experts are used but not how b_E moves, so the
    penalty is not balanced away: expert 3's share stays lower for as long as the penalty lasts."""
    penalty_E = torch.zeros(E)
    penalty_E[3] = -1.0
    plain, x_ND = skewed_router()
    penalised, _ = skewed_router()
    plain_counts_SE, plain_bias_SE = run_steps(plain, x_ND, 200)
    penalised_counts_SE, penalised_bias_SE = run_steps(penalised, x_ND, 200, penalty_E)
    assert torch.equal(plain_bias_SE, penalised_bias_SE)
    late_plain, late_penalised = plain_counts_SE[-100:].sum(0), penalised_counts_SE[-100:].sum(0)
    assert late_penalised[3] < 0.7 * late_plain[3]


def test_banned_expert_keeps_its_bias_frozen_and_does_not_flood_after_the_ban():
    module, x_ND = skewed_router()
    run_steps(module, x_ND, 200)  # balanced first
    before_E = module.expert_bias_E.clone()
    ban_E = torch.zeros(E)
    ban_E[2] = BAN_BIAS
    banned_counts_SE, banned_bias_SE = run_steps(module, x_ND, 100, ban_E)
    assert int(banned_counts_SE[:, 2].sum()) == 0
    assert bool((banned_bias_SE[:, 2] == before_E[2]).all())
    assert bool((banned_bias_SE != before_E).any(0).sum() == E - 1), "the other experts' biases keep moving"
    after = module(x_ND).counts
    assert float(after[2]) < 2 * float(after.float().mean())


def test_ban_threshold_separates_bans_from_feedback():
    """PoI bans at BAN_BIAS; quality feedback is clipped to a few units: the router's threshold lies between."""
    assert BAN_BIAS / 2 < BANNED_BELOW < -100


CLUSTERS = [
    "data=clusters",
    "transport=local",
    "router=bias_balanced",
    "data.num_clusters=16",
    "experts.d_ff=32",
    "trainer.progress=false",
    "trainer.threads=1",
    "trainer.eval_every=1000",
    "trainer.ckpt_every=1000",
    "trainer.log_every=1",
    "trainer.lr=0",  # trunk and router stay put: only the selection and balancing biases move traffic
    "poi.curvature=false",
    "++experts.behaviours={5: adversarial}",
]
PENALTY_STEPS = 150  # three times as long as the old balancing took to cancel the penalty


def share_of(run_dir, expert: int, last: int) -> float:
    events = [e for e in read_metrics(run_dir) if f"poi/load/layer0/{expert}" in e][-last:]
    return sum(e[f"poi/load/layer0/{expert}"] for e in events) / len(events)


def test_poi_penalty_still_lowers_a_harmful_experts_share_with_bias_balanced(tmp_path):
    """With poi=taylor feedback on, the harmful expert's share stays lower than with feedback off after
    many steps: balancing no longer cancels PoI's penalty (before the fix it did within ~50 steps)."""
    from moe.engine.loop import train

    logging.disable(logging.INFO)
    try:
        shares = {}
        for name, feedback in (("on", []), ("off", ["poi.feedback=0"])):
            run_dir = tmp_path / name
            overrides = [
                *CLUSTERS,
                "poi=taylor",
                *feedback,
                f"trainer.max_steps={PENALTY_STEPS}",
                f"run_dir={run_dir}",
            ]
            train(compose(overrides))
            shares[name] = share_of(run_dir, 5, last=50)
    finally:
        logging.disable(logging.NOTSET)
    assert shares["on"] < 0.5 * shares["off"]


# ---------------------------------------------------------------------------------------------- sinkhorn


def flat_logits(kind: str, num_tokens: int = 1024, seed: int = 0) -> torch.Tensor:
    """Flat (std ≈ 1) logits whose experts differ in spread (`scales`) or that come from a few directions
    of the input (`low_rank`): soft balance does not make such an argmax balanced at τ = 1."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "scales":
        return torch.randn(num_tokens, E, generator=generator) * torch.linspace(0.2, 2.0, E)
    logits_NE = torch.randn(num_tokens, 3, generator=generator) @ torch.randn(3, E, generator=generator)
    return logits_NE / logits_NE.std()


def sinkhorn_argmax_cv(logits_NE: torch.Tensor, temperature: float) -> float:
    defaults = SinkhornConfig()
    v_E = sinkhorn_expert_offsets(
        logits_NE / temperature, defaults.sinkhorn_iterations, defaults.sinkhorn_tolerance
    )
    return load_cv(torch.bincount((logits_NE / temperature + v_E).argmax(-1), minlength=E))


@pytest.mark.parametrize("kind", ["scales", "low_rank"])
def test_default_temperature_balances_the_argmax_where_temperature_one_does_not(kind):
    logits_NE = flat_logits(kind)
    assert sinkhorn_argmax_cv(logits_NE, 1.0) > 0.3
    assert sinkhorn_argmax_cv(logits_NE, SinkhornConfig().temperature) <= 0.2


def test_sinkhorn_router_routes_balanced_while_training_with_its_default_temperature():
    module, x_ND = skewed_router("sinkhorn")
    assert load_cv(module.eval()(x_ND).counts) > 0.8, "greedy routing of these tokens is skewed"
    assert load_cv(module.train()(x_ND).counts) <= 0.2


def test_sinkhorn_evaluation_is_causal_and_uses_the_training_offsets():
    """Evaluation routes each token by its own logits plus the running mean of training's offsets: a
    token's expert does not depend on the other tokens, and the routing stays close to balanced."""
    module, x_ND = skewed_router("sinkhorn")
    for _ in range(300):
        module(x_ND)
    module.eval()
    whole = module(x_ND)
    alone = torch.cat([module(x_ND[i : i + 1]).expert_idx for i in range(0, 64)])
    assert torch.equal(alone, expert_per_token(whole)[:64])
    assert load_cv(whole.counts) <= 0.2
    greedy = router.build("sinkhorn", D, E, eval_with_offsets=False)
    greedy.load_state_dict(module.state_dict())
    assert load_cv(greedy.eval()(x_ND).counts) > 0.8


def expert_per_token(plan) -> torch.Tensor:
    expert_N = torch.empty(plan.num_tokens, dtype=torch.long)
    expert_N[plan.token_idx] = plan.expert_idx
    return expert_N
