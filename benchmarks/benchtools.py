"""Helpers shared by the benchmark scripts: warm up, then the median of repeats; training runs built
from config overrides and timed in interleaved blocks of steps; a scenario loop in a temporary folder."""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's CPU seconds


def median_seconds(fn: Callable[[], object], *, repeats: int = 10, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(
    fns: dict[str, Callable[[], object]], *, repeats: int = 10, warmup: int = 2, clock: str = "wall"
) -> dict[str, float]:
    """Median seconds per function, timing them in turn each round so that load on a shared machine
    hits every contestant alike and their ratio stays meaningful. `clock="cpu"` counts the CPU time of
    this process instead of wall time: with one torch thread, the time a quiet machine would take."""
    now = CLOCKS[clock]
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = now()
            fn()
            times[name].append(now() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def build_training_run(overrides: list[str], run_dir: Path, threads: int):
    """The run `python train.py <overrides>` would build in `run_dir`, without a progress bar, in a process
    whose heap keeps freed memory where `train()`'s would (`trainer.keep_freed_memory`)."""
    from experts.heap import keep_freed_memory
    from moe.engine.build import build_run
    from tests.helpers import compose

    cfg = compose([*overrides, f"run_dir={run_dir}", "trainer.progress=false", f"trainer.threads={threads}"])
    if cfg.trainer.keep_freed_memory:
        keep_freed_memory()
    return build_run(cfg, run_dir)


def timed_train_step(run, clock: str = "wall") -> float:
    """Seconds of one training step of `run`, with the auditor's end-of-step work where it has one."""
    from moe.engine.loop import train_step

    now = CLOCKS[clock]
    run.step += 1
    start = now()
    train_step(run)
    if getattr(run, "auditor", None) is not None:
        run.auditor.after_step(run.step)
    return now() - start


def interleaved_step_times(runs: dict, blocks: int, block: int, clock: str = "wall") -> dict[str, float]:
    """Seconds per training step of each run: the median over blocks of `block` consecutive steps, the
    runs' blocks interleaved so load from other processes hits all alike, after one warm-up block each
    (`clock` as in `interleaved_medians`)."""
    times = interleaved_block_times(runs, blocks, block, clock)
    return {name: statistics.median(values) for name, values in times.items()}


def interleaved_block_times(
    runs: dict, blocks: int, block: int, clock: str = "wall"
) -> dict[str, list[float]]:
    """`interleaved_step_times` before the median: each run's seconds per step in each timed block, in
    order (block b of every run was timed in the same round, so ratios of block b pair like with like;
    the order within a round rotates, so no run always follows the same one)."""
    if blocks < 1 or block < 1:
        raise ValueError(f"need at least one block of one step, got {blocks} blocks of {block}")
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for index in range(1 + blocks):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = sum(timed_train_step(runs[name], clock) for _ in range(block)) / block
            if index > 0:
                times[name].append(seconds)
    return times


def paired_ratios(times: list[float], base: list[float]) -> tuple[float, float, float]:
    """(median, first quartile, third quartile) of the ratios times[b] / base[b] over blocks b: a
    ratio of blocks timed in the same round, so load that comes and goes hits both alike."""
    ratios = [t / b for t, b in zip(times, base, strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    first, _, third = statistics.quantiles(ratios, n=4, method="inclusive")
    return statistics.median(ratios), first, third


def run_scenarios(
    report: Callable, scenarios: dict[str, list[str]], names: list[str], args, prefix: str
) -> None:
    """`report(name, overrides, args, folder)` for each scenario named, quietly, in a temporary folder."""
    logging.disable(logging.WARNING)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        for name in names:
            report(name, scenarios[name], args, Path(tmp))
