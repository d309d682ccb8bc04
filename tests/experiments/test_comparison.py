"""Sweep comparison on synthetic Hydra multirun dirs: the table's numbers, the plots, and every odd run named."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from moe.errors import DataError
from moe.experiments.comparison import compare_sweep

LAYERS = ("layer0", "layer1")


def write_job(
    sweep: Path,
    job: int,
    overrides: list[str],
    *,
    final_loss: float,
    load_cv: tuple[float, float] = (0.2, 0.4),
    complete: bool = True,
    metrics: bool = True,
) -> Path:
    """A job dir as the trainer leaves it: overrides, metrics.jsonl (train + val events), summary.json."""
    job_dir = sweep / str(job)
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    events = []
    for step in (10, 20, 30):
        scale = 30 / step
        train = {"step": step, "train/loss": final_loss * scale, "perf/tokens_per_s": 1000.0}
        for layer, cv in zip(LAYERS, load_cv, strict=True):
            train |= {
                f"router/{layer}/load_cv": cv * scale,
                f"router/{layer}/max_vio": 2 * cv * scale,
                f"router/{layer}/dropped_frac": cv / 10,
            }
        val = {"step": step, "val/loss": final_loss * scale, "val/bpb": final_loss * scale / 0.69}
        for layer, cv in zip(LAYERS, load_cv, strict=True):  # evaluation mode: what the table must show
            val |= {
                f"val/router/{layer}/load_cv": cv * scale / 2,
                f"val/router/{layer}/max_vio": cv * scale,
                f"val/router/{layer}/first_choice_max_vio": 3 * cv * scale,
                f"val/router/{layer}/dropped_frac": cv / 20,
            }
        events += [train, val]
    if metrics:
        (job_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if complete:
        summary = {
            "step": 30,
            "val/loss": final_loss,
            "val/bpb": final_loss / 0.69,
            "perf/tokens_per_s": 1000.0 + job,
        }
        (job_dir / "summary.json").write_text(json.dumps(summary))
    return job_dir


def table_rows(report: str) -> dict[str, list[str]]:
    """Rows of the comparison table keyed by their run label, as lists of cells."""
    lines = report.split("| run | seeds |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return {
        cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)
    }


@pytest.fixture
def sweep(tmp_path) -> Path:
    losses = {"switch": [2.0, 2.2, 2.4], "topk": [1.5, 1.6, 1.7]}
    job = 0
    for router, per_seed in losses.items():
        for seed, loss in enumerate(per_seed):
            write_job(tmp_path, job, [f"router={router}", f"seed={seed}"], final_loss=loss)
            job += 1
    return tmp_path


def test_one_row_per_config_with_mean_and_std_over_seeds(sweep):
    out = compare_sweep(sweep)
    assert out == sweep / "comparison.md"
    report = out.read_text()
    rows = table_rows(report)
    assert set(rows) == {"router=switch", "router=topk"}
    seeds, causal, val_loss, causal_loss, bpb, load_cv, max_vio, first_max_vio, dropped, tokens = rows[
        "router=switch"
    ]
    assert seeds == "0, 1, 2"
    assert causal == "yes"
    assert causal_loss == "= val loss"
    assert val_loss == f"{statistics.fmean([2.0, 2.2, 2.4]):.4f} ± {statistics.stdev([2.0, 2.2, 2.4]):.4f}"
    assert bpb.startswith(f"{2.2 / 0.69:.4f} ±")
    # the final evaluation-mode values, averaged over the two layers, never the training-batch ones
    assert load_cv == "0.150 ± 0.000"
    assert max_vio == "0.300 ± 0.000"
    assert first_max_vio == "0.900 ± 0.000"
    assert dropped == "1.50 ± 0.00"
    assert tokens == "1001 ± 1"
    assert "Found 6 job dirs: 6 complete, 0 failed" in report


def test_plots_are_written_next_to_the_report(sweep):
    report = compare_sweep(sweep).read_text()
    for plot in ("val_loss.png", "load_cv.png"):
        assert (sweep / plot).stat().st_size > 1000
        assert f"({plot})" in report


def test_failed_and_metricless_runs_are_named_not_skipped(sweep):
    write_job(sweep, 6, ["router=base", "seed=0"], final_loss=9.0, complete=False)
    write_job(sweep, 7, ["router=base", "seed=1"], final_loss=3.0, metrics=False)
    (sweep / "8").mkdir()  # a job that died before Hydra wrote anything
    report = compare_sweep(sweep).read_text()
    assert "Found 9 job dirs: 7 complete, 2 failed (jobs 6, 8)" in report
    assert "1 complete without metrics (jobs 7)" in report
    rows = table_rows(report)
    assert rows["router=base"][0] == "1"  # only the complete seed
    assert rows["router=base"][2] == "3.0000"
    assert rows["router=base"][5] == "n/a"  # no routing metrics were logged
    problems = report.split("## Runs with problems", 1)[1]
    assert "job 6 (router=base seed=0): failed: no summary.json" in problems
    assert "job 7 (router=base seed=1): no metrics" in problems
    assert "job 8 (overrides unknown): overrides unreadable" in problems


def test_seed_only_sweep_is_one_defaults_row_and_a_truncated_line_is_tolerated(tmp_path):
    for seed in range(2):
        job_dir = write_job(tmp_path, seed, [f"seed={seed}"], final_loss=1.0 + seed)
        with (job_dir / "metrics.jsonl").open("a") as f:
            f.write('{"step": 40, "val/lo')  # killed mid-write
    rows = table_rows(compare_sweep(tmp_path).read_text())
    assert list(rows) == ["(defaults)"]
    assert rows["(defaults)"][2] == "1.5000 ± 0.7071"


def test_not_a_sweep_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        compare_sweep(tmp_path / "missing")
    with pytest.raises(DataError, match="no job dirs"):
        compare_sweep(tmp_path)


def test_overrides_shared_by_every_row_are_stated_once(tmp_path):
    for job, router in enumerate(("switch", "topk")):
        write_job(
            tmp_path, job, ["experiment=routing_comparison", f"router={router}", "seed=0"], final_loss=1.0
        )
    report = compare_sweep(tmp_path).read_text()
    assert "Common to all rows: `experiment=routing_comparison`" in report
    assert set(table_rows(report)) == {"router=switch", "router=topk"}


def test_rows_say_whether_their_router_is_causal(tmp_path):
    """From the overrides alone, from run_info.json's resolved config, from Hydra's saved config."""
    routers = {
        "router=switch": "yes",
        "router=base": "eval only",  # balanced while training, greedy at evaluation
        "router=expert_choice": "no",
        "router=gshard": "yes",
        "router=gshard, router.order=paper": "no",
        "router=base, router.eval_routing=balanced": "no",
    }
    for job, overrides in enumerate(routers):
        write_job(tmp_path, job, overrides.split(", "), final_loss=1.0)
    info_job = write_job(tmp_path, len(routers), ["router.name=unreadable"], final_loss=1.0)
    config = {"router": {"name": "gshard", "order": "paper", "seed": 0}}
    (info_job / "run_info.json").write_text(json.dumps({"seed": 0, "config": config}))
    hydra_job = write_job(tmp_path, len(routers) + 1, ["experiment=x"], final_loss=1.0)
    (hydra_job / ".hydra" / "config.yaml").write_text(
        "router:\n  name: base\n  seed: ${oc.select:seed,0}\n  eval_routing: greedy\n"
    )
    write_job(tmp_path, len(routers) + 2, ["router=nonexistent"], final_loss=1.0)
    report = compare_sweep(tmp_path).read_text()
    rows = table_rows(report)
    assert {label: rows[label][1] for label in routers} == routers
    assert rows["router.name=unreadable"][1] == "no"  # run_info.json wins over the overrides
    assert rows["experiment=x"][1] == "eval only"
    assert rows["router=nonexistent"][1] == "?"
    causal_losses = {label: rows[label][3] for label in (*routers, "router=nonexistent")}
    assert causal_losses == {
        "router=switch": "= val loss",
        "router=base": "= val loss",
        "router=expert_choice": "n/a",  # needs the run's checkpoint, which these jobs lack
        "router=gshard": "= val loss",
        "router=gshard, router.order=paper": "n/a",
        "router=base, router.eval_routing=balanced": "n/a",
        "router=nonexistent": "?",
    }
    assert "(router=expert_choice): no causal val loss: no checkpoint in" in report
    assert "| run | seeds | causal | val loss | causal val loss |" in report
    assert "'eval only': routing looks ahead while training" in report
