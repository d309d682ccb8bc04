"""How many cores a run may use: the machine's, shared among the sweep jobs Hydra's launcher runs at
once and the run's own worker processes. Oversubscribed cores make every parallel op wait for a
descheduled thread, so each party gets its share and no more."""

from __future__ import annotations

import os

from omegaconf import DictConfig


def cpu_count() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def concurrent_sweep_jobs() -> int:
    """How many jobs of this sweep run at once on this machine: the launcher's `n_jobs` (joblib: −1 =
    one per core) inside a multirun, else 1 (a single run, the basic launcher, or a launcher that
    places jobs on other machines and says nothing about `n_jobs`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return 1
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return 1
    n_jobs = hydra_cfg.launcher.get("n_jobs")
    if not isinstance(n_jobs, int) or n_jobs == 0:
        return 1
    return cpu_count() if n_jobs < 0 else n_jobs


def trainer_threads(cfg: DictConfig) -> int:
    """`trainer.threads` when set; else this job's share of the cores (cores ÷ concurrent sweep jobs)
    less what its local worker processes take, at least 1; 0 (torch's default) for a lone in-process run."""
    if cfg.trainer.threads > 0:
        return cfg.trainer.threads
    jobs = concurrent_sweep_jobs()
    workers_threads = cfg.transport.workers * cfg.transport.threads if cfg.transport.name == "process" else 0
    if jobs == 1 and workers_threads == 0:
        return 0
    return max(1, cpu_count() // jobs - workers_threads)
