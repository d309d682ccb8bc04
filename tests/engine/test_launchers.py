"""Sweeps on Hydra's parallel (joblib) launcher: every job completes, each trainer takes its share of the
cores instead of all of them, and `eval.py compare=` reads the sweep as it reads a basic-launcher one."""

from __future__ import annotations

import json

import pytest

from moe.engine.cores import cpu_count
from moe.experiments.comparison import compare_sweep
from tests.helpers import TINY, run_cli

pytest.importorskip(
    "hydra_plugins.hydra_joblib_launcher", reason="needs the joblib launcher (pip install -e '.[dev]')"
)


@pytest.mark.timeout(240)
def test_parallel_sweep_completes_with_a_share_of_the_cores_each(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "train.py",
        "-m",
        *TINY,
        "trainer.max_steps=2",
        "trainer.eval_every=2",
        "trainer.ckpt_every=2",
        "seed=0,1",
        "router=topk,switch",
        "hydra/launcher=parallel",
        f"hydra.sweep.dir={sweep}",
        timeout=220,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    job_dirs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in job_dirs] == ["0", "1", "2", "3"]
    for job_dir in job_dirs:
        assert (job_dir / "summary.json").is_file(), f"{job_dir} did not finish"
        machine = json.loads((job_dir / "run_info.json").read_text())["machine"]
        assert machine["trainer_threads"] == max(1, cpu_count() // 2)  # two jobs at a time share the cores
    table = compare_sweep(sweep).read_text()
    assert "Found 4 job dirs: 4 complete, 0 failed" in table, table[:500]
    assert "router=topk" in table
    assert "router=switch" in table
