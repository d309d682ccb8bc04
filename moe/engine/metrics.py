"""Run metrics: one JSON object per event in `metrics.jsonl`, mirrored to wandb when enabled."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def to_number(value: Any) -> float | int | str | None:
    """Plain JSON scalar for a metric value (tensors become floats; NaN/inf become None)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(run_dir: Path | str) -> list[dict]:
    """All events of a run, in order; a truncated last line (run killed mid-write) is ignored."""
    path = Path(run_dir) / METRICS_FILE
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("skipping a malformed line in %s", path)
    return events


def truncate_after(run_dir: Path, step: int) -> None:
    """Drop events after `step`, so a resumed run's metrics read like one uninterrupted run."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = [e for e in read_metrics(run_dir) if e.get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(e) + "\n" for e in kept))
    os.replace(tmp, path)


class MetricsLogger:
    """Appends events to metrics.jsonl (flushed each event) and, with logger=wandb, to wandb."""

    def __init__(self, run_dir: Path, cfg, *, run_name: str, config: dict, resume: bool):
        self.path = Path(run_dir) / METRICS_FILE
        self.file = self.path.open("a")
        self.wandb_run = None
        if cfg.name == "wandb":
            self.wandb_run = self._start_wandb(run_dir, cfg, run_name, config, resume)
        elif cfg.name != "jsonl":
            raise ValueError(f"unknown logger '{cfg.name}'; valid loggers: jsonl, wandb")

    @staticmethod
    def _start_wandb(run_dir, cfg, run_name, config, resume):
        import wandb  # imported lazily: slow to import and only needed here

        return wandb.init(
            project=cfg.project,
            name=run_name,
            dir=str(run_dir),
            mode=os.environ.get("WANDB_MODE", cfg.mode),
            config=config,
            tags=list(cfg.tags),
            resume="allow" if resume else None,
        )

    def log(self, step: int, values: dict[str, Any]) -> None:
        event = {"step": step, **{k: to_number(v) for k, v in values.items()}}
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in event.items() if k != "step"}, step=step)

    def close(self) -> None:
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
