"""Checkpoints: what a run's state is (`checkpoint_state`/`restore`), atomic writes, tensors-only loading
(`weights_only=True`), clear errors."""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import OmegaConf

from moe.engine.market import restore_market
from moe.errors import CheckpointError

if TYPE_CHECKING:
    from moe.engine.build import Run

log = logging.getLogger(__name__)

FORMAT = "poimoe-checkpoint-v1"
CHECKPOINT_DIR = "checkpoints"
_STEP_FILE = re.compile(r"step_(\d+)\.pt$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:07d}.pt"


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write `state` for `step` atomically (temp file + rename), then prune to the newest `keep`."""
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"format": FORMAT, "step": step, **state}, tmp)
    os.replace(tmp, path)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / CHECKPOINT_DIR
    found = [p for p in folder.glob("step_*.pt") if _STEP_FILE.search(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(_STEP_FILE.search(p.name).group(1)))


def find_checkpoint(run_dir_or_file: str | Path) -> Path:
    """The newest checkpoint of a run dir, or the file itself; a clear error when there is none."""
    path = Path(run_dir_or_file).expanduser()
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"no checkpoint in {path / CHECKPOINT_DIR} (expected step_*.pt files)")
    return found[-1]


def load_checkpoint(run_dir_or_file: str | Path) -> tuple[Path, dict]:
    path = find_checkpoint(run_dir_or_file)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, garbage bytes, foreign pickle: all mean "corrupt"
        reason = str(err).split(". ")[0][:160]
        raise CheckpointError(f"corrupt checkpoint {path}: {type(err).__name__}: {reason}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a poimoe checkpoint (missing format tag {FORMAT!r})")
    return path, state


def run_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINT_DIR else checkpoint.parent


def checkpoint_state(run: Run) -> dict:
    pools = {layer.name: layer.pool.state_dict() for layer in run.layers}
    return {
        "model": run.accelerator.unwrap_model(run.model).state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "pools": pools,
        "incomplete": missing_experts(pools),
        "poi": run.scorer.state_dict() if run.scorer is not None else None,
        "audits": run.auditor.state_dict() if run.auditor is not None else None,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "sim_seconds": run.sim_seconds,
        "market": run.market.state_dict() if run.market is not None else None,
        "config": OmegaConf.to_container(run.cfg, resolve=True),
        # the ledger's signed head (an anchor `python -m moe.ledger verify` checks) and unrevealed weights
        "ledger": run.ledger.checkpoint_state() if run.ledger is not None else None,
    }


def missing_experts(pools: dict[str, dict]) -> dict[str, list[int]]:
    """Experts whose state a pool could not get (an unreachable worker, no own checkpoint), by layer."""
    missing = {layer: state["missing"] for layer, state in pools.items() if state.get("missing")}
    if missing:
        log.warning(
            "checkpoint is incomplete: experts %s are missing (their workers were unreachable)", missing
        )
    return missing


def check_complete(path: Path, state: dict, accept_incomplete: bool) -> None:
    """Refuse to resume from a checkpoint marked incomplete unless `resume_incomplete=true` says so."""
    missing = state.get("incomplete") or {}
    if not missing:
        return
    named = "; ".join(f"{layer}: experts {experts}" for layer, experts in missing.items())
    if not accept_incomplete:
        raise CheckpointError(
            f"{path} is incomplete: {named} were unreachable when it was written. Resume from an earlier "
            "checkpoint, or pass resume_incomplete=true to restart those experts from their initial weights"
        )
    log.warning("resuming from incomplete %s: %s restart from their initial weights", path, named)


def restore(run: Run, state: dict) -> None:
    run.accelerator.unwrap_model(run.model).load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    for layer in run.layers:
        layer.pool.load_state_dict(state["pools"][layer.name])
    if run.scorer is not None and state.get("poi"):
        run.scorer.load_state_dict(state["poi"])
    if run.auditor is not None and state.get("audits"):
        run.auditor.load_state_dict(state["audits"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(_as_random_state(state["rng"]["python"]))
    run.step = int(state["step"])
    run.sim_seconds = float(state.get("sim_seconds", 0.0))
    restore_market(run, state)


def _as_random_state(saved) -> tuple:
    version, internal, gauss = saved
    return version, tuple(internal), gauss
