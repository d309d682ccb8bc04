"""The ledger writer's file life (moe.incentives.ledger.writer): single writer, resume, kill."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from moe.engine.checkpoint import list_checkpoints
from moe.errors import LedgerError
from moe.ledger import RewardLedger, verify_ledger, verify_run
from tests.helpers import TINY
from tests.helpers.ledger_drivers import (
    PROCESS_TIMEOUT_S,
    SUBNETS,
    balances,
    block_count,
    block_hashes,
    child_process,
    drive,
    make_config,
    run_ledger,
    training_process,
    write_ledger,
)


@pytest.fixture
def written_ledger(tmp_path: Path) -> Path:
    return write_ledger(tmp_path / "ledger.sqlite")


def test_second_writer_in_this_process_is_refused(tmp_path):
    ledger_path = tmp_path / "ledger.sqlite"
    with (
        RewardLedger(ledger_path, make_config(), SUBNETS, seed=7),
        pytest.raises(LedgerError, match="already open for writing"),
    ):
        RewardLedger(ledger_path, make_config(), SUBNETS, seed=7)
    RewardLedger(ledger_path, make_config(), SUBNETS, seed=7).close()  # free again after close


@pytest.mark.timeout(PROCESS_TIMEOUT_S)
def test_second_writer_process_is_refused(tmp_path):
    ledger_path = tmp_path / "ledger.sqlite"
    with (
        RewardLedger(ledger_path, make_config(), SUBNETS, seed=7),
        child_process("try_second_writer", str(ledger_path)) as process,
    ):
        output, _ = process.communicate(timeout=PROCESS_TIMEOUT_S)
        assert process.returncode == 3, output
        assert f"already open for writing by another process (pid {os.getpid()})" in output


def test_reopening_without_resume_step_is_refused(written_ledger):
    with pytest.raises(LedgerError, match="resume_step"):
        RewardLedger(written_ledger, make_config(), SUBNETS, seed=7)


def test_resuming_with_other_settings_is_refused(written_ledger):
    with pytest.raises(LedgerError, match="different config"):
        RewardLedger(written_ledger, make_config(kappa=0.6), SUBNETS, seed=7, resume_step=60)
    with pytest.raises(LedgerError, match="different seed"):
        RewardLedger(written_ledger, make_config(), SUBNETS, seed=8, resume_step=60)


def test_resuming_past_the_ledger_is_refused(written_ledger):
    with pytest.raises(LedgerError, match="missing"):
        RewardLedger(written_ledger, make_config(), SUBNETS, seed=7, resume_step=70)


@pytest.mark.parametrize("resume_step", [40, 43, 50])
def test_resume_matches_an_uninterrupted_run(tmp_path, resume_step):
    reference, resumed = tmp_path / "reference.sqlite", tmp_path / "resumed.sqlite"
    run_ledger(reference, 80)
    run_ledger(resumed, 66)  # overshoots the checkpoint, as a crash after it would
    with RewardLedger(resumed, make_config(), SUBNETS, seed=7, resume_step=resume_step) as ledger:
        assert ledger.height == resume_step // 2
        drive(ledger, resume_step + 1, 80)
    verify_ledger(resumed)
    assert balances(resumed) == balances(reference)
    if resume_step % 2 == 0:  # no step of a half-open block was lost, so every block is identical
        assert block_hashes(resumed) == block_hashes(reference)


def _kill_writer_and_resume(tmp_path: Path, min_blocks: int) -> None:
    killed = tmp_path / "killed.sqlite"
    with child_process("run_forever", str(killed)) as process:
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while block_count(killed) < min_blocks:
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the writer made no progress"
            time.sleep(0.01)
        if min_blocks:
            verify_ledger(killed)  # a reader sees a consistent snapshot while the writer runs
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=PROCESS_TIMEOUT_S)
    # Killed before the file existed there is nothing to verify; the resumed run then starts it afresh.
    report_blocks = verify_ledger(killed).blocks if killed.exists() else 0
    last_step = report_blocks * 2
    resume_step = max(last_step - 5, 0)
    with RewardLedger(killed, make_config(), SUBNETS, seed=7, resume_step=resume_step) as ledger:
        drive(ledger, resume_step + 1, last_step + 10)
    reference = tmp_path / f"reference-{min_blocks}.sqlite"
    run_ledger(reference, last_step + 10)
    verify_ledger(killed)
    assert balances(killed) == balances(reference)


@pytest.mark.timeout(PROCESS_TIMEOUT_S)
def test_killed_writer_leaves_a_ledger_that_verifies_and_resumes(tmp_path):
    _kill_writer_and_resume(tmp_path, min_blocks=25)


@pytest.mark.slow
@pytest.mark.timeout(5 * PROCESS_TIMEOUT_S)
@pytest.mark.parametrize("min_blocks", [0, 1, 7, 64, 200])
def test_killed_at_many_instants(tmp_path, min_blocks):
    _kill_writer_and_resume(tmp_path, min_blocks)


@pytest.mark.timeout(6 * PROCESS_TIMEOUT_S)
def blocks_just_past_a_checkpoint(run_dir: Path, ledger: Path) -> bool:
    """Blocks written past the newest checkpoint (past step 14), but at most 5 of its 10 steps: killed
    now, the run cannot have reached its next checkpoint between this look and the signal."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints or not ledger.exists():
        return False
    blocks = block_count(ledger)
    past = blocks - 1 - int(checkpoints[-1].stem.removeprefix("step_"))
    return blocks > 14 and 1 <= past <= 5


def test_sigkilled_training_run_resumes_to_a_ledger_that_verifies(tmp_path):
    """A training run killed mid-way (after a checkpoint, with blocks written past it) and resumed leaves a
    run dir whose ledger verifies against every anchored head; commit-reveal, so the checkpoint must also
    carry the validators' unrevealed weights."""
    run_dir = tmp_path / "run"
    overrides = [
        *TINY,
        "data=clusters",
        "ledger.tempo=3",
        "ledger.commit_reveal=true",
        "trainer.ckpt_every=10",
        "trainer.eval_every=1000",
        "trainer.log_every=1000",
        f"run_dir={run_dir}",
    ]
    ledger = run_dir / "ledger.sqlite"
    with training_process(*overrides, "trainer.max_steps=5000", cwd=tmp_path) as process:
        deadline = time.monotonic() + 3 * PROCESS_TIMEOUT_S
        while not blocks_just_past_a_checkpoint(run_dir, ledger):
            assert process.poll() is None, process.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=PROCESS_TIMEOUT_S)
    checkpoint_step = int(list_checkpoints(run_dir)[-1].stem.removeprefix("step_"))
    assert block_count(ledger) - 1 > checkpoint_step  # blocks past the checkpoint, to be rolled back
    verify_run(run_dir)  # the killed run's anchors already hold
    with training_process(
        *overrides, f"trainer.max_steps={checkpoint_step + 13}", f"resume={run_dir}", cwd=tmp_path
    ) as process:
        output, _ = process.communicate(timeout=3 * PROCESS_TIMEOUT_S)
        assert process.returncode == 0, output[-3000:]
    report = verify_run(run_dir)
    assert report.blocks == checkpoint_step + 13
    assert report.anchors >= 2  # the last checkpoints and summary.json
