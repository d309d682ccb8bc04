"""The results page from a tiny real sweep (`eval.py report=`), and the routing mutual information."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe.engine.validation import routing_mutual_information
from moe.experiments.page_sections import verdict
from moe.experiments.page_spec import GapGridSpec
from moe.experiments.sweeps import expected_job_count
from tests.helpers import REPO

ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


# ---------------------------------------------------------------------------------------------- MI


def test_mi_is_zero_when_routing_ignores_the_domain():
    table_GE = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]])  # rows proportional: independent
    assert routing_mutual_information(table_GE) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(("domains", "experts"), [(4, 8), (4, 4), (4, 2)])
def test_mi_of_perfect_specialisation_is_log2_min(domains, experts):
    table_GE = torch.zeros(domains, experts)
    for g in range(domains):  # every domain sends all its tokens to one expert, experts shared evenly
        table_GE[g, g % experts] = 10.0
    assert routing_mutual_information(table_GE) == pytest.approx(math.log2(min(domains, experts)))


def test_mi_matches_a_hand_computed_table():
    # p = [[3, 1], [1, 3]] / 8, marginals 1/2: MI = 2·(3/8)·log2(3/2) + 2·(1/8)·log2(1/2)
    expected = 0.75 * math.log2(1.5) - 0.25
    assert routing_mutual_information(torch.tensor([[3.0, 1.0], [1.0, 3.0]])) == pytest.approx(expected)


def test_mi_of_an_empty_table_is_zero():
    assert routing_mutual_information(torch.zeros(4, 8)) == 0.0


# ---------------------------------------------------------------------------------------------- helpers


def test_expected_job_count_merges_config_and_command_line_sweeps():
    params = {"router": "topk,hash,random", "seed": "0,1,2"}
    assert expected_job_count(["experiment=x", "seed=0"], params) == 3
    assert expected_job_count(["experiment=x"], params) == 9
    assert expected_job_count(["a=1,2"], None) == 2


def test_verdict_names_the_gap_at_the_claimed_factor():
    grid = GapGridSpec(factor="p", by="latency", factor_label="drop prob", claim_at=0.1, within_percent=5.0)
    cells = {(0.0, 0.0): [2.0, 2.0], (0.1, 0.0): [2.04, 2.04]}
    assert "+2.00 %" in verdict(cells, grid)
    assert "at drop prob 0.1" in verdict(cells, grid)
    assert "claim holds" in verdict(cells, grid)
    assert "does NOT hold" in verdict({(0.0, 0.0): [2.0], (0.1, 0.0): [2.5]}, grid)
    assert "not testable" in verdict({(0.0, 0.0): [2.0], (0.25, 0.0): [2.5]}, grid)


# ---------------------------------------------------------------------------------------------- page


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory) -> Path:
    """A real 2-job sweep of the specialisation experiment at debug scale, plus a failed job."""
    root = tmp_path_factory.mktemp("sweeps")
    sweep = root / "specialisation"
    command = [
        sys.executable,
        "train.py",
        "-m",
        "experiment=specialisation",
        "debug=default",
        "transport=local",
        "router=topk,hash",
        "seed=0",
        "trainer.max_steps=2",
        f"hydra.sweep.dir={sweep}",
    ]
    subprocess.run(command, cwd=REPO, env=ENV, check=True, capture_output=True, timeout=120)
    failed = sweep / "2"
    shutil.copytree(sweep / "1" / ".hydra", failed / ".hydra")
    died_after_step_0 = json.dumps({"step": 0, "val/loss": 5.5}) + "\n"
    (failed / "metrics.jsonl").write_text(died_after_step_0)
    return root


def run_eval(*args: str, cwd: Path = REPO) -> None:
    """`python eval.py <args>` from `cwd` (this checkout's code wins wherever it runs); must succeed."""
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), ENV.get("PYTHONPATH")]))}
    command = [sys.executable, str(REPO / "eval.py"), *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="module")
def page(sweep_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")  # a folder: the page goes to out/results.md
    run_eval(f"report={sweep_root}", f"out={out}")
    return out / "results.md"


def test_page_has_a_section_with_command_seeds_machine_and_table(page):
    text = page.read_text()
    assert "## specialisation" in text
    assert "python train.py -m experiment=specialisation debug=default" in text
    assert "- Seeds: 0" in text
    assert "CPU cores, device cpu" in text
    assert "- Wall time:" in text
    assert "| run | seeds | causal | val loss | causal val loss |" in text  # a byte LM: causality shown
    assert "| router=topk | 0 | yes |" in text
    assert "MI layer0 (bits)" in text
    assert "| router=topk |" in text
    assert "| router=hash |" in text


def test_page_lists_the_failed_run(page):
    text = page.read_text()
    assert "Missing or failed runs" in text
    assert "job 2 (" in text
    assert "failed: no summary.json" in text


def test_page_figures_exist_and_are_linked(page):
    text = page.read_text()
    figures = page.parent / "figures"
    for name in ("specialisation_val_loss.png", "specialisation_heatmap_layer0.png"):
        assert (figures / name).stat().st_size > 1000
        assert f"(figures/{name})" in text


def test_final_validation_logs_domain_mi_and_tables(sweep_root):
    job = sweep_root / "specialisation" / "0"
    summary = json.loads((job / "summary.json").read_text())
    assert 0.0 <= summary["routing/layer0/domain_mi"] <= 2.0
    tables = json.loads((job / "routing_tables.json").read_text())
    assert tables["domains"] == ["python", "cpp", "docs", "bible"]
    assert len(tables["layers"]["layer0"]) == 4


def test_page_names_folders_relative_never_absolute(page, sweep_root):
    text = page.read_text()
    assert str(sweep_root) not in text
    assert re.search(r"[`(=]/\w", text) is None  # no absolute path in code spans, links or the command
    assert f"- Sweep dir: `{sweep_root.name}/specialisation`" in text  # outside the cwd: by name
    assert f"report={sweep_root.name} out=results.md" in text


def repo_files() -> set[str]:
    """Every file git sees in the repo (tracked, untracked and ignored), bytecode caches aside."""
    listing = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "--ignored"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line for line in listing.splitlines() if "__pycache__" not in line}


def test_report_without_out_writes_beside_the_sweeps_and_nothing_in_the_repo(sweep_root):
    before = repo_files()
    committed_page = (REPO / "docs" / "results.md").read_bytes()
    run_eval(f"report={sweep_root}")
    page = sweep_root / "results.md"
    assert "## specialisation" in page.read_text()
    assert (sweep_root / "figures" / "specialisation_val_loss.png").stat().st_size > 1000
    assert repo_files() == before
    assert (REPO / "docs" / "results.md").read_bytes() == committed_page


def test_out_naming_a_page_puts_figures_beside_it(sweep_root, tmp_path):
    out = tmp_path / "site" / "page.md"
    run_eval(f"report={sweep_root}", f"out={out}")
    assert "(figures/specialisation_heatmap_layer0.png)" in out.read_text()
    assert (out.parent / "figures" / "specialisation_heatmap_layer0.png").exists()


def test_sweep_inside_the_cwd_is_named_relative_to_it(sweep_root, tmp_path):
    out = tmp_path / "page.md"
    run_eval("report=.", f"out={out}", cwd=sweep_root)
    assert "- Sweep dir: `specialisation`;" in out.read_text()
