"""What a reader needs to reproduce a run: `run_info.json` with the resolved config, seed, git commit and machine."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from moe.engine.build import Run
from moe.engine.cores import cpu_count

RUN_INFO_FILE = "run_info.json"
SUMMARY_FILE = "summary.json"  # written by the loop at the end of a run: final metrics, PoI, rewards


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def write_run_info(run: Run) -> None:
    """Resolved config, seed, git commit and machine: what a reader needs to reproduce the run."""
    info = {
        "seed": run.cfg.seed,
        "git_commit": git_commit(),
        "config": resolved(run.cfg),
        "device": str(run.accelerator.device),
        "machine": {
            "platform": platform.platform(),
            "cpus": cpu_count(),
            "trainer_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        # the public key that signs ledger.sqlite (its private key stays outside the run dir)
        "ledger_writer": run.ledger.writer_hotkey if run.ledger is not None else None,
    }
    (run.run_dir / RUN_INFO_FILE).write_text(json.dumps(info, indent=2))


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent.parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
