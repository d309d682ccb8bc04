"""The results page shows what each experiment file's `report:` block declares, and names paths portably."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe.errors import ConfigError
from moe.experiments.page_spec import ColumnSpec, ReportSpec, columns_for, load_report_spec
from moe.experiments.render import display_path, markdown_table, mean_pm_std
from moe.experiments.results_page import page_path, write_results_page
from tests.helpers import CONFIGS

EXPERIMENTS = sorted(CONFIGS.glob("experiment/*.yaml"))
SUMMARY = {"val/loss": 2.0, "routing/layer0/domain_mi": 0.5, "routing/layer1/domain_mi": 0.25}


def titles(spec: ReportSpec, summaries: list[dict] | None = None) -> list[str]:
    return [c.title for c in columns_for(spec, [SUMMARY] if summaries is None else summaries)]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_file_declares_a_valid_report_block(path):
    assert "report" in path.read_text()
    spec = load_report_spec(path)
    assert titles(spec)[0] == "val loss"


def test_standard_columns_expand_mi_per_layer_and_can_be_chosen():
    assert titles(ReportSpec()) == [
        "val loss",
        "bits/byte",
        "load CV",
        "MaxVio",
        "1st-choice MaxVio",
        "dropped %",
        "tokens/s",
        "MI layer0 (bits)",
        "MI layer1 (bits)",
    ]
    assert titles(ReportSpec(standard_columns=["tokens/s", "val loss"])) == ["tokens/s", "val loss"]
    assert "MI layer0 (bits)" not in titles(ReportSpec(), [{"val/loss": 1.0}])  # no run logged MI: no column


def test_bad_report_blocks_fail_naming_the_key():
    with pytest.raises(ConfigError, match="standard_columns.*'val los'"):
        columns_for(ReportSpec(standard_columns=["val los"]), [])
    with pytest.raises(ConfigError, match=r"report.columns.0.value: 'median'"):
        columns_for(ReportSpec(columns=[ColumnSpec("x", key="a", value="median")]), [])
    with pytest.raises(ConfigError, match=r"report.columns.0.keys"):
        columns_for(ReportSpec(columns=[ColumnSpec("x", value="sum")]), [])


def test_column_values_final_mean_sum_and_share():
    events = [
        {"step": 1, "a": 1.0, "m/x": 1.0, "m/y": 3.0},
        {"step": 2, "a": 3.0, "m/x": 2.0, "m/y": 2.0, "other/z": 100.0},
    ]
    spec = ReportSpec(
        standard_columns=[],
        columns=[
            ColumnSpec("final", key="a"),
            ColumnSpec("mean", key="a", value="mean"),
            ColumnSpec("sum", keys=["m/x", "m/y"], value="sum"),
            ColumnSpec("share x", key="m/x", value="share"),
        ],
    )
    values = [c.final({"a": 5.0}, events) for c in columns_for(spec, [])]
    assert values == [5.0, 2.0, 4.0, 0.5]  # final prefers summary.json; share counts only m/ siblings


def test_render_helpers():
    assert mean_pm_std([], ".2f") == "n/a"
    assert mean_pm_std([1.0], ".2f") == "1.00"
    assert mean_pm_std([1.0, 3.0], ".1f") == "2.0 ± 1.4"
    assert markdown_table(["a", "b"], [["1", "2"]], align="lr") == ["| a | b |", "|---|---:|", "| 1 | 2 |"]


def test_display_path_is_relative_inside_the_cwd_else_the_name(tmp_path):
    inside = tmp_path / "sweeps" / "a"
    assert display_path(inside, cwd=tmp_path) == "sweeps/a"
    assert display_path(inside, cwd=tmp_path / "elsewhere") == "a"
    assert page_path(inside, None) == inside / "results.md"
    assert page_path(inside, tmp_path / "docs" / "results.md") == tmp_path / "docs" / "results.md"
    assert page_path(inside, tmp_path / "docs") == tmp_path / "docs" / "results.md"


# ---------------------------------------------------------------------------------------------- a synthetic sweep

DROP, LATENCY = "transport.network.default.drop_prob", "transport.network.default.latency_ms"


def write_grid_job(sweep: Path, job: int, drop: float, seed: int, loss: float) -> None:
    """A completed fault-tolerance job as the trainer leaves it (config, overrides, metrics, summary)."""
    hydra = sweep / str(job) / ".hydra"
    hydra.mkdir(parents=True)
    overrides = ["experiment=fault_tolerance", f"{DROP}={drop}", f"seed={seed}"]
    (hydra / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    config = {
        "name": "fault_tolerance",
        "seed": seed,
        "transport": {"network": {"default": {"drop_prob": drop, "latency_ms": 0.0}}},
    }
    (hydra / "config.yaml").write_text(json.dumps(config))
    summary = {"val/loss": loss, "perf/tokens_per_s": 100.0, "perf/sim_tokens_per_s": 50.0 / (1 + drop)}
    (sweep / str(job) / "summary.json").write_text(json.dumps(summary))
    (sweep / str(job) / "metrics.jsonl").write_text(json.dumps({"step": 10, "val/loss": loss}) + "\n")


def test_fault_tolerance_section_comes_from_its_experiment_file(tmp_path):
    sweep = tmp_path / "sweeps" / "ft"
    for job, (drop, seed, loss) in enumerate([(0.0, 0, 2.0), (0.0, 1, 2.0), (0.1, 0, 2.04), (0.1, 1, 2.04)]):
        write_grid_job(sweep, job, drop, seed, loss)
    page = write_results_page(tmp_path / "sweeps", tmp_path / "out" / "results.md", CONFIGS / "experiment")
    text = page.read_text()
    assert "| run | seeds | val loss | bits/byte | tokens/s | simulated tokens/s |" in text
    assert "**Claim check** (Learning@home" in text
    assert "| 0.1 | 0 | 2.0400 ± 0.0000 | +2.00 % | +2.00 %, +2.00 % |" in text
    assert "the claim holds" in text
    assert "Latency runs in virtual time" not in text  # the note is for grids with several latencies
    assert (page.parent / "figures" / "fault_tolerance_gap_grid.png").stat().st_size > 1000
    assert "- Sweep dir: `sweeps/ft`" in text


def test_without_an_experiment_file_the_page_shows_the_standard_columns(tmp_path):
    sweep = tmp_path / "ft"
    for job, (drop, seed) in enumerate([(0.0, 0), (0.1, 0)]):
        write_grid_job(sweep, job, drop, seed, 2.0)
    text = write_results_page(sweep, experiment_dir=tmp_path / "no-configs").read_text()
    assert "| run | seeds | val loss | bits/byte | load CV |" in text
    assert "Claim check" not in text
    assert "Experiment file" not in text
    assert (sweep / "results.md").exists()
