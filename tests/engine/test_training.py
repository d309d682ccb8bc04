"""End-to-end training: learning happens, resume is exact, bad input fails clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe.engine.build import trunk_optimizer
from moe.engine.metrics import read_metrics
from moe.errors import CheckpointError, DataError
from tests.helpers import REPO, TINY, compose, keep_only_checkpoint, run_cli


def first_and_last(events: list[dict], key: str) -> tuple[float, float]:
    values = [e[key] for e in events if key in e]
    return values[0], values[-1]


def test_clusters_run_ends_well_below_its_starting_loss(run_tiny):
    summary, run_dir = run_tiny(
        "data=clusters",
        "trainer.max_steps=150",
        "trainer.eval_every=150",
        "experts.num=4",
        "model.d_model=64",
        "experts.d_ff=64",
    )
    start, end = first_and_last(read_metrics(run_dir), "val/loss")
    assert end < 0.5 * start, (start, end)


def test_mixture_run_lowers_val_bits_per_byte(run_tiny, tmp_path):
    summary, run_dir = run_tiny(
        "trainer.max_steps=40",
        "trainer.eval_every=40",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_bytes_per_domain=200000",
        "model.d_model=64",
        "data.seq_len=64",
        "data.batch_size=8",
    )
    start, end = first_and_last(read_metrics(run_dir), "val/bpb")
    assert end < 0.85 * start, (start, end)
    assert {"val/python/bpb", "val/cpp/bpb"} <= set(summary)


def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(run_tiny):
    # router noise and the AdamW states of trunk and experts must all be restored for this to hold
    common = ("data=clusters", "trainer.eval_every=2", "trainer.log_every=1", "router.noise_std=0.5")
    straight_summary, straight = run_tiny(
        *common, "trainer.max_steps=8", "trainer.ckpt_every=4", name="straight"
    )
    _, first_half = run_tiny(*common, "trainer.max_steps=8", "trainer.ckpt_every=4", name="interrupted")
    # simulate a run killed after its step-4 checkpoint: drop later checkpoints and metrics
    keep_only_checkpoint(first_half, 4)
    summary, _ = run_tiny(*common, "trainer.max_steps=8", f"resume={first_half}", name="unused")
    resumed = Path(summary["run_dir"])
    assert resumed == first_half
    # the ledger rolls back the blocks after the checkpoint and ends with the same balances
    assert summary["rewards"]["by_role"] == straight_summary["rewards"]["by_role"]
    assert summary["rewards"]["blocks"] == 8
    want, got = read_metrics(straight), read_metrics(resumed)
    assert [e["step"] for e in got] == [e["step"] for e in want]
    for w, g in zip(want, got, strict=True):
        for key in w:
            if not key.startswith("perf/"):
                assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-7), (w["step"], key)


def test_run_dir_records_config_seed_and_commit(run_tiny):
    _, run_dir = run_tiny("data=clusters", "seed=7")
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["seed"] == 7
    assert info["config"]["seed"] == 7
    assert "git_commit" in info
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 6


def test_missing_data_file_is_one_line_naming_it(tmp_path):
    missing = tmp_path / "nope.txt"
    result = run_cli("train.py", *TINY, "data=text", f"data.files=[{missing}]", f"run_dir={tmp_path / 'r'}")
    assert result.returncode != 0
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr


def test_missing_data_file_raises_data_error(tmp_path):
    from moe.engine.loop import train

    cfg = compose([*TINY, "data=text", f"data.files=[{tmp_path / 'absent.txt'}]", f"run_dir={tmp_path}"])
    with pytest.raises(DataError, match="absent.txt"):
        train(cfg)


def test_resume_from_missing_or_corrupt_checkpoint_names_it(tmp_path):
    from moe.engine.loop import train

    with pytest.raises(CheckpointError, match="does not exist"):
        train(compose([*TINY, "data=clusters", f"resume={tmp_path / 'gone'}"]))
    bad = tmp_path / "checkpoints" / "step_0000001.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt checkpoint .*step_0000001.pt"):
        train(compose([*TINY, "data=clusters", f"resume={tmp_path}"]))


def test_truncated_checkpoint_is_reported_as_corrupt(run_tiny):
    _, run_dir = run_tiny("data=clusters")
    from moe.engine.checkpoint import list_checkpoints, load_checkpoint

    last = list_checkpoints(run_dir)[-1]
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(run_dir)


def test_bf16_autocast_trains_with_every_expert_answering(run_tiny):
    summary, run_dir = run_tiny(
        "data=clusters",
        "trainer.precision=bf16",
        "trainer.max_steps=60",
        "trainer.eval_every=60",
        "trainer.log_every=20",
    )
    start, end = first_and_last(read_metrics(run_dir), "val/loss")
    assert end < 0.8 * start, (start, end)
    failures = [k for e in read_metrics(run_dir) for k in e if k.startswith("poi/failures/")]
    assert not failures, "bf16 expert outputs must not be rejected as invalid"


def test_wandb_logger_runs_offline_and_still_writes_metrics(run_tiny, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # CI has no network; disabled mode exercises the calls
    summary, run_dir = run_tiny("data=clusters", "logger=wandb")
    assert (run_dir / "metrics.jsonl").read_text().count("\n") >= 6
    assert summary["step"] == 6


def test_run_dir_holds_the_whole_run_and_nothing_lands_in_the_working_directory(tmp_path):
    """`run_dir=` is where everything goes, Hydra's own .hydra/ and log included."""
    cwd, run_dir = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    result = run_cli(
        str(REPO / "train.py"), *TINY, "data=clusters", "trainer.max_steps=2", f"run_dir={run_dir}", cwd=cwd
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(cwd.iterdir()) == []
    assert {".hydra", "summary.json", "run_info.json", "metrics.jsonl"} <= {p.name for p in run_dir.iterdir()}


def test_ledger_records_failures_without_a_poi_scorer(run_tiny):
    """The ledger's failure rule needs each step's answers whether or not PoI scores the experts."""
    import sqlite3

    _, run_dir = run_tiny("data=clusters", "~poi", "++experts.behaviours={1: crash:0}", "trainer.max_steps=4")
    with sqlite3.connect(run_dir / "ledger.sqlite") as conn:
        failed = dict(conn.execute("SELECT miner, SUM(failed) FROM failures GROUP BY miner").fetchall())
    assert failed.get(1, 0) >= 4, failed
    assert all(count == 0 for miner, count in failed.items() if miner != 1), failed


@pytest.mark.parametrize("keep", [True, False])
def test_the_trainer_keeps_freed_memory_unless_told_not_to(run_tiny, monkeypatch, keep):
    import moe.engine.loop

    calls = []
    monkeypatch.setattr(moe.engine.loop, "keep_freed_memory", lambda: calls.append("tuned") or True)
    summary, _ = run_tiny("data=clusters", "trainer.max_steps=2", f"trainer.keep_freed_memory={keep}")
    assert summary["step"] == 2
    assert calls == (["tuned"] if keep else [])


@pytest.mark.parametrize("saved_fused", [None, False, True])
def test_a_resumed_trunk_optimizer_keeps_this_runs_kernel_choice(tmp_path, saved_fused):
    model = torch.nn.Linear(4, 4)
    cfg = compose(TINY).trainer
    saved = trunk_optimizer(model, cfg, torch.device("cpu")).state_dict()
    for group in saved["param_groups"]:  # as written before the trunk was fused, or on another device
        group["fused"] = saved_fused
    for device, fused in (("cpu", True), ("meta", False)):  # meta: a device without the fused kernel
        optimizer = trunk_optimizer(model, cfg, torch.device(device))
        optimizer.load_state_dict(saved)
        assert [group["fused"] for group in optimizer.param_groups] == [fused]
