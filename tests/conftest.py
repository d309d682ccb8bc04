"""Fixtures only: the offline environment and tiny training runs. Helpers live in `tests.helpers`."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

from tests.helpers import TINY, compose

# Ledger writer keys (moe.incentives.ledger.signing) go to a folder of this session, never the user's.
if "POIMOE_KEYS_DIR" not in os.environ:
    os.environ["POIMOE_KEYS_DIR"] = tempfile.mkdtemp(prefix="poimoe-test-keys-")
    atexit.register(shutil.rmtree, os.environ["POIMOE_KEYS_DIR"], ignore_errors=True)
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def run_tiny(tmp_path):
    """Train a tiny run in its own dir and return (summary, run_dir)."""

    def run(*overrides: str, name: str = "run"):
        from moe.engine.loop import train

        run_dir = tmp_path / name
        cfg = compose([*TINY, f"run_dir={run_dir}", *overrides])
        return train(cfg), run_dir

    return run
