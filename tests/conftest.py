"""Shared fixtures: offline environment, composed configs, tiny runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
TINY = ["debug=default", "transport=local"]  # in-process experts: fast; process transport has its own tests


def compose(overrides: list[str] | None = None, config_name: str = "train"):
    """The config `python train.py <overrides>` would get, without running Hydra's app."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import moe.config  # noqa: F401  (registers schemas)

    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return hydra_compose(config_name=config_name, overrides=overrides or [])


@pytest.fixture
def run_tiny(tmp_path):
    """Train a tiny run in its own dir and return (summary, run_dir)."""

    def run(*overrides: str, name: str = "run"):
        from moe.training import train

        run_dir = tmp_path / name
        cfg = compose([*TINY, f"run_dir={run_dir}", *overrides])
        return train(cfg), run_dir

    return run


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
