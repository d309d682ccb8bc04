"""Balance metrics a plan carries: first choices are counted before capacity drops them."""

from __future__ import annotations

import torch

import router

D, E, N = 16, 4, 64


def test_first_choice_counts_are_the_argmax_before_capacity_drops():
    torch.manual_seed(0)
    switch = router.build("switch", D, E, capacity_factor=0.5, eval_capacity_factor=0.5).eval()
    with torch.no_grad():
        switch.gate.weight[0] += 3.0  # expert 0 is everyone's favourite, far over its capacity
    x_ND = torch.randn(N, D).abs()
    plan = switch(x_ND)
    wanted_E = torch.bincount(switch.logits(x_ND).argmax(-1), minlength=E)
    assert torch.equal(plan.first_choice_counts, wanted_E)
    assert plan.dropped.numel() > 0, "the test needs overflow to mean anything"
    assert int(plan.counts.sum()) + plan.dropped.numel() == int(wanted_E.sum())
    assert int(plan.first_choice_counts[0]) > int(plan.counts[0]), "expert 0's overflow is dropped"
    first_E = wanted_E.float()
    assert float(plan.metrics["first_choice_max_vio"]) == float(first_E.max() / first_E.mean() - 1)


def test_expert_choice_has_no_per_token_first_choice():
    plan = router.build("expert_choice", D, E)(torch.randn(N, D))
    assert plan.first_choice_counts is None
    assert "first_choice_max_vio" not in plan.metrics
