"""Prefix evaluation: each val token scored from the model run on its prefix alone. Against a plain loop
of one-sequence forwards; equal to the full-sequence val loss exactly when routing is causal and per
token; cached per checkpoint; shown in the sweep comparison.

Legend: S val sequences, T time.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from moe.engine.build import build_run
from moe.engine.validation import evaluate
from moe.experiments.prefix_eval import CAUSAL_EVAL_FILE, causal_val_loss, prefix_loss
from tests.helpers import TINY, compose

SEQ_LEN = 16
SHORT = [f"data.seq_len={SEQ_LEN}"]


def untrained(tmp_path, router_name: str):
    """A tiny byte LM at its seeded initialisation, with `router_name`, and its val batches."""
    torch.manual_seed(0)
    run = build_run(compose([*TINY, *SHORT, f"router={router_name}"]), tmp_path)
    return run.model, run.data.val_batches()


def one_sequence_loop_loss(model, batches) -> float:
    """The reference: for every sequence and position, a batch of one sequence, cut after the position."""
    inputs_ST = torch.cat([b.inputs for b in batches])
    targets_ST = torch.cat([b.targets for b in batches])
    model.eval()
    losses = []
    with torch.no_grad():
        for s in range(inputs_ST.shape[0]):
            for t in range(inputs_ST.shape[1]):
                logits_1TY, _ = model(inputs_ST[s : s + 1, : t + 1])
                losses.append(float(F.cross_entropy(logits_1TY[0, -1], targets_ST[s, t])))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("router_name", ["topk", "hash", "bias_balanced", "sinkhorn", "base"])
def test_causal_per_token_routers_prefix_loss_equals_the_val_loss(tmp_path, router_name):
    model, batches = untrained(tmp_path, router_name)
    assert all(layer.router.is_causal(training=False) for layer in model.moe_layers())
    full = evaluate(model, batches, ["python", "cpp", "docs", "bible"])["val/loss"]
    assert prefix_loss(model, batches, window=SEQ_LEN) == pytest.approx(full, abs=1e-5)


def test_expert_choice_prefix_loss_differs_and_matches_one_sequence_at_a_time(tmp_path):
    """Expert choice looks at the whole batch, its own future included: scored from prefixes it loses
    that view. Batching the prefixes (each routed alone) gives exactly the one-sequence loop."""
    model, batches = untrained(tmp_path, "expert_choice")
    assert not model.moe_layers()[0].router.is_causal(training=False)
    full = evaluate(model, batches, ["python", "cpp", "docs", "bible"])["val/loss"]
    causal = prefix_loss(model, batches, window=SEQ_LEN)
    assert causal == pytest.approx(one_sequence_loop_loss(model, batches), abs=1e-5)
    assert abs(causal - full) > 1e-4  # float noise is ~1e-7


def test_causal_val_loss_is_cached_per_checkpoint(run_tiny, monkeypatch):
    import moe.experiments.prefix_eval as prefix_eval

    _, run_dir = run_tiny("router=expert_choice", *SHORT)
    first = causal_val_loss(run_dir)
    cache = json.loads((run_dir / CAUSAL_EVAL_FILE).read_text())
    assert cache["step_0000006.pt"]["val/causal_loss"] == first["val/causal_loss"]
    assert first["tokens"] == 2 * 4 * SEQ_LEN  # debug: 2 val batches of 4 sequences
    assert first["val/causal_bpb"] == pytest.approx(first["val/causal_loss"] / 0.6931471805599453)

    def must_not_run(path):
        raise AssertionError(f"recomputed {path} although its cache entry is valid")

    monkeypatch.setattr(prefix_eval, "evaluate_prefixes", must_not_run)
    assert causal_val_loss(run_dir) == first
    with (run_dir / "checkpoints" / "step_0000006.pt").open("ab") as file:
        file.write(b"\0")  # a different checkpoint under the same name: the digest no longer matches
    with pytest.raises(AssertionError, match="recomputed"):
        causal_val_loss(run_dir)


def test_comparison_shows_the_causal_val_loss_of_non_causal_rows(run_tiny):
    from moe.experiments.comparison import compare_sweep
    from tests.experiments.test_comparison import table_rows

    summaries = {}
    for job, router_name in enumerate(("expert_choice", "topk")):
        summaries[router_name], job_dir = run_tiny(f"router={router_name}", *SHORT, name=f"sweep/{job}")
        (job_dir / ".hydra").mkdir()
        (job_dir / ".hydra" / "overrides.yaml").write_text(f"- router={router_name}\n- seed=0\n")
    sweep = job_dir.parent
    rows = table_rows(compare_sweep(sweep).read_text())
    cached = json.loads((sweep / "0" / CAUSAL_EVAL_FILE).read_text())["step_0000006.pt"]
    _, causal, val_loss, causal_loss = rows["router=expert_choice"][:4]
    assert (causal, val_loss) == ("no", f"{summaries['expert_choice']['val/loss']:.4f}")
    assert causal_loss == f"{cached['val/causal_loss']:.4f}"
    assert cached["val/loss"] == pytest.approx(summaries["expert_choice"]["val/loss"], abs=1e-6)
    assert rows["router=topk"][1] == "yes"
    assert rows["router=topk"][3] == "= val loss"
    assert not (sweep / "1" / CAUSAL_EVAL_FILE).exists()  # a causal router needs no prefix evaluation
