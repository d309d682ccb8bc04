"""`transport=process`: experts live in worker processes ("miners") that own them; the trainer keeps
only the trunk and the routers. Importing this module registers the transport as "process".

`ProcessTransport` spawns `workers` local workers (`python -m experts.worker`, the command a
hand-started worker runs too), waits for them and any `external_workers` to register with
its `Coordinator`, makes a `RemotePool` per MoE layer on them, and tears everything down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from experts.errors import ConfigError
from experts.modules import ExpertsConfig
from experts.network import network_is_ideal
from experts.remote.client import RemotePool
from experts.remote.coordinator import Coordinator
from experts.remote.wire import WorkerSettings
from experts.transport import LocalTransportConfig, Transport, register_transport

log = logging.getLogger(__name__)


@dataclass
class ProcessTransportConfig(WorkerSettings, LocalTransportConfig):
    """Workers and addresses of `transport=process`; the fault semantics and the simulated network
    come from `LocalTransportConfig` (see `FaultPolicy`) and mean the same in both transports. How
    workers serve (`max_grad_norm`, `heartbeat_interval`, `cache_size`) comes from `WorkerSettings`."""

    name: str = "process"
    workers: int = 2  # worker processes the trainer spawns on this machine
    external_workers: int = 0  # workers started by hand (python -m experts.worker) to wait for
    address: str = "ipc"  # ipc (one host) | tcp (across hosts)
    host: str = "127.0.0.1"  # tcp: interface to bind; 0.0.0.0 accepts workers from other hosts
    port: int = 0  # tcp: port to bind; 0 picks a free one (logged)
    threads: int = 1  # torch intra-op threads per worker
    # one device per spawned worker, e.g. [cuda:1, cuda:2]; None: cuda:i round-robin, else the CPU
    devices: list[str] | None = None
    heartbeat_misses: int = 5  # silent intervals before a worker counts as dead
    register_timeout: float = 60.0  # seconds to wait for workers to start and register
    request_timeout: float = 60.0  # seconds for hosting, state and checkpoint requests
    max_frame_mb: float = 1024.0  # largest tensor frame either side accepts
    checkpoint_every: int = 0  # workers checkpoint themselves every N steps; 0: at trainer checkpoints


def worker_devices(cfg: ProcessTransportConfig) -> list[str]:
    """One device per spawned worker: as configured, else cuda:i round-robin, else the CPU."""
    if cfg.devices:
        return [cfg.devices[i % len(cfg.devices)] for i in range(cfg.workers)]
    if torch.cuda.is_available():
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(cfg.workers)]
    return ["cpu"] * cfg.workers


def spawn_worker(name: str, address: str, device: str, cfg: ProcessTransportConfig, log_dir: Path | None):
    """`python -m experts.worker` as a child that exits when this process dies."""
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads), "MKL_NUM_THREADS": str(cfg.threads)}
    command = [
        sys.executable,
        "-m",
        "experts.worker",
        "--coordinator",
        address,
        "--name",
        name,
        "--device",
        device,
        "--threads",
        str(cfg.threads),
        "--parent-pid",
        str(os.getpid()),
        "--max-frame-mb",
        str(cfg.max_frame_mb),
        "--log-level",
        logging.getLevelName(log.getEffectiveLevel()),
    ]
    output = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        output = open(log_dir / "worker.log", "ab")  # noqa: SIM115 (the child holds it)
    try:
        return subprocess.Popen(
            command,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
            stdin=subprocess.DEVNULL,
        )
    finally:
        if output is not None:
            output.close()


def stop_processes(processes: list[subprocess.Popen], grace_s: float = 2.0) -> None:
    """Wait `grace_s` for workers told to shut down, then SIGTERM (after SIGCONT), then SIGKILL."""
    deadline = time.monotonic() + grace_s
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
    for sig in (signal.SIGCONT, signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in processes if p.poll() is None]
        for process in alive:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
        for process in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=1.0)


class ProcessTransport(Transport):
    """Spawns the workers, makes a `RemotePool` per MoE layer on them, and tears everything down."""

    def __init__(self, cfg: ProcessTransportConfig, *, device: torch.device, run_dir: Path | None, seed: int):
        if cfg.workers + cfg.external_workers < 1:
            raise ConfigError("transport.workers + transport.external_workers must be at least 1")
        self.cfg, self.run_dir, self.seed = cfg, Path(run_dir) if run_dir is not None else None, seed
        network_is_ideal(cfg.network)  # fails now, not after the workers started, on a bad link spec
        self.processes: list[subprocess.Popen] = []
        self._finalizer = weakref.finalize(self, stop_processes, self.processes, 0.0)
        self.coordinator = Coordinator(cfg, self.run_dir)
        self.closed = False
        self.next_slot = 0
        try:
            names = self.spawn_workers()
            self.coordinator.wait_for_workers(names, cfg.external_workers, cfg.register_timeout)
        except BaseException:
            self.close()
            raise

    def spawn_workers(self) -> list[str]:
        names = []
        for i, device in enumerate(worker_devices(self.cfg)):
            name = f"w{i}"
            log_dir = self.run_dir / "workers" / name if self.run_dir is not None else None
            process = spawn_worker(name, self.coordinator.connect_address, device, self.cfg, log_dir)
            self.processes.append(process)
            self.coordinator.expect(name, process)
            names.append(name)
        return names

    def make_pool(self, layer: str, experts: list[nn.Module], experts_cfg: ExpertsConfig) -> RemotePool:
        """Experts go to workers round-robin, continuing across layers."""
        workers = self.coordinator.registered_names()
        hosts = [workers[(self.next_slot + e) % len(workers)] for e in range(len(experts))]
        self.next_slot += len(experts)
        return RemotePool(
            self.coordinator,
            layer,
            experts,
            experts_cfg,  # the experts config is its own `OptimizerSettings`
            hosts,
            self.cfg,  # the transport config is its own fault policy
            network=self.cfg.network,
            seed=self.seed,
            checkpoint_every=self.cfg.checkpoint_every,
        )

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.coordinator.close()
        stop_processes(self.processes)


register_transport("process", ProcessTransportConfig, ProcessTransport)
