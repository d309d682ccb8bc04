"""A trained run rebuilt from its checkpoint, for the commands that evaluate it: the report, text
generation and prefix evaluation. The experts run in this process (the checkpoint holds every one) or,
for generation, where the run ran them: worker processes are started and loaded as resume does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from moe.engine.build import Run, build_run
from moe.engine.checkpoint import load_checkpoint, run_dir_of
from moe.engine.cores import trainer_threads
from moe.engine.market import restore_market


def checkpoint_config(
    ckpt: str | Path, num_val_batches: int | None = None, *, in_process: bool = True
) -> tuple[Path, dict, DictConfig]:
    """(checkpoint path, its state, the run's config to rebuild it with): on the CPU, with every expert
    in this process when `in_process` (the checkpoint holds them all), else where the run kept them."""
    path, state = load_checkpoint(ckpt)
    cfg = OmegaConf.create(state["config"])
    if in_process:
        cfg.transport = {"name": "local"}
    cfg.trainer.device = "cpu"
    if num_val_batches is not None:
        cfg.data.num_val_batches = num_val_batches
    return path, state, cfg


def open_trained(path: Path, state: dict, cfg: DictConfig, data=None) -> Run:
    """Build the run `cfg` describes (workers too, for `transport=process`, as resume does) and load the
    checkpoint's trunk and experts into it, with the torch threads training used (`trainer_threads`);
    the caller closes `run.transport`."""
    threads = trainer_threads(cfg)
    if threads > 0:
        torch.set_num_threads(threads)
    run = build_run(cfg, run_dir_of(path), data=data)
    try:
        model = run.accelerator.unwrap_model(run.model)
        model.load_state_dict(state["model"])
        for layer in model.moe_layers():
            layer.pool.load_state_dict(state["pools"][layer.name])
        restore_market(run, state)  # experts where the run's leases left them
    except BaseException:
        run.transport.close()
        raise
    return run


def load_trained(ckpt: str | Path, num_val_batches: int | None = None) -> tuple[Run, dict]:
    """Rebuild a run's data and model from a checkpoint, with its experts in this process."""
    path, state, cfg = checkpoint_config(ckpt, num_val_batches)
    return open_trained(path, state, cfg), state


def context_window(cfg: DictConfig) -> int:
    """The longest context a byte LM was trained on: `data.seq_len`, within `model.max_seq_len` (positions
    beyond the trained length have untrained embeddings)."""
    return min(int(cfg.model.max_seq_len), int(cfg.data.seq_len))
