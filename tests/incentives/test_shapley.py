"""Per-token Shapley values and the exact reference: where the layer's game splits into per-token games,
the cheap scorer must equal exact Shapley values from all 2^E coalitions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from moe.errors import ConfigError
from moe.incentives.poi import ExactShapleyConfig, TokenShapleyConfig, views_on_batch
from moe.incentives.poi.fidelity import counted_forwards, fidelity, kendall, rival_scorers
from moe.incentives.poi.shapley import exact_shapley, positions_in_token, token_shapley
from tests.helpers import TINY, compose


def trained(tmp_path, *overrides: str, steps: int):
    from moe.engine.build import build_run
    from moe.engine.loop import seed_everything, train_step

    cfg = compose([*overrides, "trainer.threads=1", "poi.feedback=0", f"run_dir={tmp_path}"])
    seed_everything(cfg.seed)
    run = build_run(cfg, tmp_path)
    for _ in range(steps):
        run.step += 1
        train_step(run)
    return run


@pytest.fixture(scope="module")
def clusters_run(tmp_path_factory):
    overrides = [
        "data=clusters",
        "transport=local",
        "experts.num=6",
        "experts.d_ff=16",
        "trainer.progress=false",
    ]
    return trained(tmp_path_factory.mktemp("clusters"), *overrides, steps=40)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    return trained(tmp_path_factory.mktemp("lm"), *TINY, "model.n_layers=2", "experts.num=5", steps=8)


def contributions(cfg, run, generator_seed: int = 0) -> dict[str, torch.Tensor]:
    batch = run.data.val_batches()[0]
    views = views_on_batch(cfg, run.model, batch, torch.Generator().manual_seed(generator_seed))
    return {name: view.contribution_E for name, view in views.items()}


def test_token_shapley_is_exact_on_a_layer_followed_by_per_token_operations(clusters_run):
    exact_E = contributions(ExactShapleyConfig(), clusters_run)["layer0"]
    token_E = contributions(TokenShapleyConfig(), clusters_run)["layer0"]
    assert exact_E.abs().max() > 1e-3  # a game with something to rank
    torch.testing.assert_close(token_E, exact_E, atol=2e-6, rtol=1e-4)


def test_token_shapley_is_exact_on_the_last_layer_of_a_language_model(lm_run):
    exact = contributions(ExactShapleyConfig(), lm_run)
    token = contributions(TokenShapleyConfig(), lm_run)
    torch.testing.assert_close(token["layer1"], exact["layer1"], atol=2e-6, rtol=1e-4)
    # layer0 feeds attention, which mixes tokens: an approximation there, but a close one
    assert float((token["layer0"] - exact["layer0"]).abs().max()) < 0.5 * float(exact["layer0"].abs().max())


def test_token_shapley_on_a_three_player_token_game_with_known_values():
    """One token with three experts whose loss is −(sum of the present experts' values) − a bonus when
    experts 0 and 1 are both present: Shapley = value + half the bonus each for 0 and 1. Two permutations
    are a Monte-Carlo estimate with k = 3; every permutation of three players once is exact."""
    value = torch.tensor([1.0, 2.0, 0.5])

    def token_losses_of(keep_A: torch.Tensor) -> torch.Tensor:
        return -(value * keep_A).sum(0, keepdim=True) - 3.0 * float(keep_A[0] and keep_A[1])

    token_idx_A, expert_idx_A = torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 2])
    many = token_shapley(
        token_losses_of, token_idx_A, expert_idx_A, 1, 3, 600, torch.Generator().manual_seed(0)
    )
    assert many.tolist() == pytest.approx([2.5, 3.5, 0.5], abs=0.2)


def test_positions_order_each_tokens_assignments():
    token_idx_A = torch.tensor([0, 1, 0, 2, 1, 0])
    position_A = positions_in_token(token_idx_A, 3, torch.Generator().manual_seed(3))
    for token in range(3):
        mine = position_A[token_idx_A == token].sort().values
        assert mine.tolist() == list(range(int((token_idx_A == token).sum())))


def test_token_shapley_forwards_are_a_few_per_layer(lm_run):
    """One unmasked pass, then per layer the empty coalition and one pass per half of the antithetic pair."""
    with counted_forwards(lm_run.model) as forwards:
        contributions(TokenShapleyConfig(), lm_run)
    assert forwards[0] == 1 + 2 * 3
    with counted_forwards(lm_run.model) as forwards:
        contributions(ExactShapleyConfig(), lm_run)
    assert forwards[0] == 1 + 2 * (2**5 - 1)


def test_exact_shapley_refuses_too_many_experts():
    with pytest.raises(ConfigError, match="13 experts"):
        exact_shapley(lambda keep_E: 0.0, 13)


def test_kendall_against_counting_pairs_by_hand():
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])
    assert kendall(a, a) == 1.0
    assert kendall(a, -a) == -1.0
    assert kendall(a, b) == pytest.approx((5 - 1) / 6)
    tied = torch.tensor([1.0, 1.0, 2.0, 3.0])  # τ-b: 5 concordant of sqrt(5 · 6) comparable pairs
    assert kendall(tied, a) == pytest.approx(5 / math.sqrt(5 * 6))
    assert math.isnan(kendall(torch.ones(4), a))


def test_fidelity_measures_every_rival_against_exact_shapley(clusters_run):
    batch = clusters_run.data.val_batches()[0]
    results = fidelity(clusters_run.model, batch, 8, torch.Generator().manual_seed(0))
    for scorer in rival_scorers():
        assert -1.0 <= results[f"poi/fidelity/layer0/{scorer}"] <= 1.0
        assert -1.0 <= results[f"poi/fidelity_kendall/layer0/{scorer}"] <= 1.0
        assert results[f"poi/fidelity_forwards/{scorer}"] >= 1
    assert results["poi/fidelity/layer0/token_shapley"] == pytest.approx(1.0)  # exact on this task
    assert results["poi/fidelity_forwards/reference"] == 2**6  # the unmasked pass is the full coalition
    assert results["poi/fidelity_forwards/token_shapley"] == 1 + 3


def test_every_coalition_mask_is_visited_once_by_exact_shapley():
    seen = []
    exact_shapley(lambda keep_E: seen.append(tuple(keep_E.tolist())) or 0.0, 3)
    assert sorted(seen) == sorted(itertools.product([False, True], repeat=3))


def test_miners_earn_before_the_scorers_first_view(run_tiny):
    """token_shapley views every 50 steps; until its first view the run's own validator weighs miners by a
    fresh view, as the other validators do, so miners earn from the first epoch (not burned emission)."""
    summary, _ = run_tiny(
        "data=clusters", "poi=token_shapley", "trainer.max_steps=20", "trainer.ckpt_every=20"
    )
    assert all(summary[f"poi/score/layer0/{e}"] == 0 for e in range(4))  # no view yet: nothing to score
    rewards = summary["rewards"]
    assert rewards["by_behaviour"]["miner/honest"]["units"] > 0
