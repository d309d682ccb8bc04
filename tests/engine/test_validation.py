"""Validation pools each layer's load over the whole validation set, in evaluation mode."""

from __future__ import annotations

import torch

from moe.engine.build import build_run
from moe.engine.validation import evaluate
from router.plan import routing_metrics
from tests.helpers import TINY, compose


def test_pooled_balance_matches_a_plain_sum_over_validation_batches(tmp_path):
    cfg = compose(
        [*TINY, "data=clusters", "router=switch", "router.eval_capacity_factor=0.5", f"run_dir={tmp_path}"]
    )
    run = build_run(cfg, tmp_path)
    try:
        model, batches = run.accelerator.unwrap_model(run.model), run.data.val_batches()
        results = evaluate(model, batches, run.data.domains)
        assert model.training, "evaluate restores the training mode"
        counts_E, first_E, dropped = 0, 0, 0
        model.eval()
        with torch.no_grad():
            for batch in batches:  # the reference: one forward per batch, the plan's counts summed by hand
                model(batch.inputs)
                plan = model.moe_layers()[0].last_plan
                counts_E, first_E, dropped = (
                    counts_E + plan.counts,
                    first_E + plan.first_choice_counts,
                    dropped + plan.dropped.numel(),
                )
        reference = routing_metrics(counts_E, dropped, first_choice_E=first_E)
        for key in ("load_cv", "max_vio", "dropped_frac", "first_choice_max_vio"):
            assert results[f"val/router/layer0/{key}"] == float(reference[key]), key
        assert results["val/router/layer0/dropped_frac"] > 0, "capacity 0.5 must drop at evaluation"
    finally:
        run.transport.close()
