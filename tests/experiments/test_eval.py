"""eval.py: reports from real runs, and clear errors for missing or corrupt checkpoints."""

from __future__ import annotations

from tests.helpers import run_cli


def test_report_has_domains_expert_load_and_a_loss_curve(run_tiny):
    from moe.experiments.run_report import write_run_report

    _, run_dir = run_tiny()  # the mixture corpus: 4 domains
    results = write_run_report(run_dir)
    report = (run_dir / "report.md").read_text()
    for domain in ("python", "cpp", "docs", "bible"):
        assert f"| {domain} |" in report
    assert "Domain × expert" in report
    assert "Per-expert load" in report
    assert "loss_curve.png" in report
    assert (run_dir / "loss_curve.png").stat().st_size > 1000
    assert "## Rewards" in report
    assert "| miner/honest |" in report
    assert (run_dir / "emission.png").stat().st_size > 1000
    assert results["val/bpb"] > 0


def test_report_numbers_match_the_run_final_eval(run_tiny):
    from moe.experiments.run_report import write_run_report

    summary, run_dir = run_tiny("data=clusters")
    results = write_run_report(run_dir)
    assert abs(results["val/loss"] - summary["val/loss"]) < 1e-6


def test_eval_without_ckpt_names_ckpt(tmp_path):
    result = run_cli("eval.py", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "ckpt" in result.stderr
    assert "Traceback" not in result.stderr


def test_eval_of_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    result = run_cli("eval.py", f"ckpt={bad}", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert f"corrupt checkpoint {bad}" in result.stderr
    assert "Traceback" not in result.stderr


def test_eval_cli_writes_the_report(run_tiny, tmp_path):
    _, run_dir = run_tiny("data=clusters")
    result = run_cli("eval.py", f"ckpt={run_dir}", f"hydra.run.dir={tmp_path / 'h'}")
    assert result.returncode == 0, result.stderr
    assert (run_dir / "report.md").exists()
