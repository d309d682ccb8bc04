"""The detection and fidelity tables of the results page, from hand-made runs with known answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe.experiments.comparison import JobRun
from moe.experiments.detection import DetectionSpec, detection_section, run_detection
from moe.experiments.poi_report import fidelity_table
from moe.experiments.sweeps import Sweep

SPEC = DetectionSpec(
    factor="audit.rate", by="experts.behaviours", failed_key="audits/layer0/1/failed",
    honest_prefixes=["audits/layer0/0/"], within=100,
)  # fmt: skip


def audited_run(
    job: str, behaviour: str, rate: float, seed: int, caught_at: int | None
) -> tuple[JobRun, dict]:
    events = [
        {"step": step, "audits/layer0/1/failed": float(caught_at is not None and step >= caught_at),
         "audits/layer0/0/run": float(step // 10), "audits/layer0/0/failed": 0.0}
        for step in range(5, 101, 5)
    ]  # fmt: skip
    run = JobRun(job, [f"seed={seed}"], {"val/loss": 1.0}, events)
    return run, {"seed": seed, "audit": {"rate": rate}, "experts": {"behaviours": {"1": behaviour}}}


def test_detection_counts_caught_seeds_first_steps_and_honest_false_positives(tmp_path):
    cases = [("a", "lazy", 0.05, 0, 10), ("b", "lazy", 0.05, 1, 30), ("c", "lazy", 0.0, 0, None),
             ("d", "replay", 0.05, 0, None), ("e", "replay", 0.05, 1, 150)]  # fmt: skip
    runs, configs = [], {}
    for job, behaviour, rate, seed, caught_at in cases:
        run, config = audited_run(job, behaviour, rate, seed, caught_at)
        runs.append(run)
        configs[job] = config
    lines = detection_section(Sweep(Path(tmp_path), "audits", runs, configs), SPEC, "audits", tmp_path)
    text = "\n".join(lines)
    assert "| lazy | 0/1 | 2/2 (step 20) |" in text
    assert "| replay | 0/0 | 0/2 |" in text  # no run at rate 0; caught at step 150: beyond `within`
    assert "0 failed of 50 audits" in text
    assert (tmp_path / "audits_detection.png").exists()


def test_run_detection_is_the_first_logged_step_with_a_failure():
    run, _ = audited_run("a", "lazy", 0.05, 0, 35)
    assert run_detection(run.events, SPEC).first_step == 35
    assert not run_detection(audited_run("b", "lazy", 0.05, 0, None)[0].events, SPEC).caught


def test_fidelity_table_averages_runs_and_reports_the_minimum():
    def events(rho: float) -> list[dict]:
        return [
            {"step": 50, "poi/fidelity/layer0/token_shapley": rho, "poi/fidelity_kendall/layer0/token_shapley": rho,
             "poi/fidelity_forwards/token_shapley": 4.0, "poi/fidelity_forwards/reference": 256.0,
             "poi/fidelity/layer0/gate": 0.5, "poi/fidelity_forwards/gate": 1.0},
            {"step": 100, "poi/fidelity/layer0/token_shapley": rho - 0.1, "poi/fidelity/layer0/gate": 0.3},
        ]  # fmt: skip

    text = "\n".join(fidelity_table([events(1.0), events(0.8)]))
    # token_shapley: run means 0.95 and 0.75 → 0.85 ± 0.14, minimum 0.75; 4 of 256 forwards
    assert "| token_shapley | 0.85 ± 0.14 (0.75) |" in text
    assert "| 4 | 1.6 % |" in text
    assert text.index("token_shapley |") < text.index("gate |")  # best worst-layer ρ first
    assert fidelity_table([[{"step": 1, "val/loss": 2.0}]]) == []


@pytest.mark.parametrize("rate", [0.0, 0.1])
def test_detection_section_is_empty_without_completed_runs(tmp_path, rate):
    run, config = audited_run("a", "lazy", rate, 0, None)
    run.summary = None
    assert detection_section(Sweep(Path(tmp_path), "audits", [run], {"a": config}), SPEC, "x", tmp_path) == []
