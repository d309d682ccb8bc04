"""Test helpers shared by the suite: composing configs, running the CLIs, tiny runs.

Imported by test modules directly (`from tests.helpers import compose`), never through conftest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
TINY = ["debug=default", "transport=local"]  # in-process experts: fast; process transport has its own tests


def compose(overrides: list[str] | None = None, config_name: str = "train"):
    """The config `python train.py <overrides>` would get, without running Hydra's app."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import moe.engine.config  # noqa: F401  (registers schemas)

    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return hydra_compose(config_name=config_name, overrides=overrides or [])


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a repo script the way a user would; returns the finished process."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


def keep_only_checkpoint(run_dir: Path, step: int) -> None:
    """Delete every checkpoint of `run_dir` but step `step`'s: a run killed right after writing it."""
    from moe.engine.checkpoint import checkpoint_path, list_checkpoints

    kept = checkpoint_path(run_dir, step)
    assert kept.exists(), kept
    for checkpoint in list_checkpoints(run_dir):
        if checkpoint != kept:
            checkpoint.unlink()
