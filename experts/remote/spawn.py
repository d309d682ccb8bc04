"""`transport=process`: experts live in worker processes ("miners") that own them; the trainer keeps
only the trunk and the routers. Importing this module registers the transport as "process".

`ProcessTransport` launches `workers` workers (`transport.launch`: `local` spawns `python -m
experts.worker`, the command a hand-started worker runs too; `ray` places them as Ray actors, see
`experts.remote.ray_launch`; `manual` starts none and waits for that many started by hand), waits for
them and any `external_workers` to register with its `Coordinator`, makes a `RemotePool` per MoE layer
on them, and tears everything down. Each launched worker gets a key made for the run (in the
coordinator's private folder, when CURVE is on) and its own state dir, `<run_dir>/workers/<name>/`,
from whoever starts it, never over the wire.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from experts.errors import ConfigError
from experts.modules import ExpertsConfig
from experts.network import network_is_ideal
from experts.remote.auth import uses_curve
from experts.remote.client import RemotePool
from experts.remote.coordinator import Coordinator
from experts.remote.ray_launch import RayLaunchConfig, RayWorkers, check_ray_config
from experts.remote.settings import DEFAULT_FRAME_MB, DEFAULT_MESSAGE_MB, WorkerSettings, launched_limits
from experts.transport import LocalTransportConfig, Placement, Transport, register_transport

log = logging.getLogger(__name__)


@dataclass
class ProcessTransportConfig(WorkerSettings, LocalTransportConfig):
    """Workers and addresses of `transport=process`; the fault semantics and the simulated network
    come from `LocalTransportConfig` (see `FaultPolicy`) and mean the same in both transports. How
    workers serve (`max_grad_norm`, `heartbeat_interval`, `cache_size`) comes from `WorkerSettings`."""

    name: str = "process"
    workers: int = 2  # workers the run launches (or, with launch=manual, waits for)
    launch: str = "local"  # local: subprocesses here | ray: Ray actors (transport.ray) | manual: by hand
    ray: RayLaunchConfig = field(default_factory=RayLaunchConfig)  # launch=ray: placement and restarts
    external_workers: int = 0  # workers started by hand (python -m experts.worker) to wait for, besides
    address: str = "ipc"  # ipc (one host) | tcp (across hosts)
    host: str = "127.0.0.1"  # tcp: interface to bind; 0.0.0.0 accepts workers from other hosts
    port: int = 0  # tcp: port to bind; 0 picks a free one (logged)
    auth: str = "auto"  # curve | none | auto: CURVE on tcp; ipc sits in a private (0700) folder instead
    key: str | None = None  # the coordinator's (subnet owner's) key file; None: a key made for the run
    allowed_keys: list[str] = field(
        default_factory=list
    )  # hotkeys (hex or .pub paths) of hand-started workers
    max_workers: int = 0  # cap on registered worker names; 0: workers + external_workers
    threads: int = 1  # torch intra-op threads per worker
    # one device per spawned worker, e.g. [cuda:1, cuda:2]; None: cuda:i round-robin, else the CPU
    devices: list[str] | None = None
    heartbeat_misses: int = 5  # silent intervals before a worker counts as dead
    register_timeout: float = 60.0  # seconds to wait for workers to start and register
    request_timeout: float = 60.0  # seconds for hosting, state and checkpoint requests
    max_frame_mb: float = DEFAULT_FRAME_MB  # largest tensor frame either side accepts
    max_message_mb: float = DEFAULT_MESSAGE_MB  # largest message (all its frames) either side accepts
    checkpoint_every: int = 0  # workers checkpoint themselves every N steps; 0: at trainer checkpoints


LAUNCHES = ("local", "ray", "manual")


def check_launch(cfg: ProcessTransportConfig) -> None:
    """`transport.launch` and the options that go with it; errors name the bad value."""
    if cfg.launch not in LAUNCHES:
        raise ConfigError(f"transport.launch={cfg.launch!r}; valid: {', '.join(LAUNCHES)}")
    check_ray_config(cfg.ray, cfg.launch)
    if cfg.launch == "ray" and cfg.devices:
        raise ConfigError(
            f"transport.devices={list(cfg.devices)} is for launch=local; a Ray actor's device is cuda:0 "
            "when it has transport.ray.num_gpus, else the CPU"
        )


def market_workers(cfg: ProcessTransportConfig, hosts: list[str]) -> ProcessTransportConfig:
    """The config with one launched worker per market provider; only `launch=local` places them."""
    if cfg.launch != "local":
        raise ConfigError(
            f"transport.launch={cfg.launch!r} with a market: providers' workers need launch=local"
        )
    return dataclasses.replace(cfg, workers=len(hosts))


def hand_started(cfg: ProcessTransportConfig) -> int:
    """Workers to wait for that nobody launches: `external_workers`, and `workers` under launch=manual."""
    return cfg.external_workers + (cfg.workers if cfg.launch == "manual" else 0)


def worker_devices(cfg: ProcessTransportConfig) -> list[str]:
    """One device per spawned worker: as configured, else cuda:i round-robin, else the CPU."""
    if cfg.devices:
        return [cfg.devices[i % len(cfg.devices)] for i in range(cfg.workers)]
    if torch.cuda.is_available():
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(cfg.workers)]
    return ["cpu"] * cfg.workers


def spawn_worker(name: str, coordinator: Coordinator, device: str, cfg: ProcessTransportConfig,
                 state_dir: Path | None, key_path: Path | None):  # fmt: skip
    """`python -m experts.worker` as a child that exits when this process dies; it keeps its
    checkpoint and log in `state_dir` and proves `key_path` under CURVE."""
    limits = launched_limits(cfg)  # the launcher sets a spawned worker's own limits from the config
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads), "MKL_NUM_THREADS": str(cfg.threads)}
    command = [
        sys.executable, "-m", "experts.worker",
        "--coordinator", coordinator.connect_address,
        "--name", name,
        "--device", device,
        "--threads", str(cfg.threads),
        "--parent-pid", str(os.getpid()),
        "--max-frame-mb", str(limits.max_frame_mb),
        "--max-message-mb", str(limits.max_message_mb),
        "--max-cache", str(limits.max_cache),
        "--max-grad-norm", str(limits.max_grad_norm),
        "--log-level", logging.getLevelName(log.getEffectiveLevel()),
    ]  # fmt: skip
    if state_dir is not None:
        command += ["--state-dir", str(state_dir)]
    if key_path is not None:
        command += ["--key", str(key_path), "--coordinator-key", coordinator.identity.hotkey]
    output = None
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        output = open(state_dir / "worker.log", "ab")  # noqa: SIM115 (the child holds it)
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
    """Launches the workers, makes a `RemotePool` per MoE layer on them, and tears everything down."""

    def __init__(self, cfg: ProcessTransportConfig, *, device: torch.device, run_dir: Path | None, seed: int,
                 hosts: list[str] | None = None):  # fmt: skip
        """`hosts`: a market's provider workers; one is launched per name (instead of `workers`)."""
        check_launch(cfg)
        if hosts is not None:
            cfg = market_workers(cfg, hosts)
        self.worker_names = list(hosts) if hosts is not None else [f"w{i}" for i in range(cfg.workers)]
        external = hand_started(cfg)
        if cfg.workers + cfg.external_workers < 1:
            raise ConfigError("transport.workers + transport.external_workers must be at least 1")
        if 0 < cfg.max_workers < cfg.workers + cfg.external_workers:
            raise ConfigError(f"transport.max_workers={cfg.max_workers} < workers + external_workers")
        address = "tcp" if cfg.launch == "ray" else cfg.address  # Ray actors connect over tcp
        if external and uses_curve(cfg.auth, address) and not cfg.allowed_keys:
            raise ConfigError(
                "hand-started workers (transport.external_workers, or workers under launch=manual) need "
                "their hotkeys in transport.allowed_keys under CURVE "
                "(make a key with: python -m experts.worker keygen PATH)"
            )
        self.cfg, self.run_dir, self.seed = cfg, Path(run_dir) if run_dir is not None else None, seed
        network_is_ideal(cfg.network)  # fails now, not after the workers started, on a bad link spec
        self.processes: list[subprocess.Popen] = []
        self._finalizer = weakref.finalize(self, stop_processes, self.processes, 0.0)
        self.ray_workers, self.coordinator, self.closed = None, None, False
        self.next_slot = 0
        try:
            if cfg.launch == "ray":
                self.ray_workers = RayWorkers(cfg)
                cfg = self.ray_workers.coordinator_config(cfg)
            self.cfg = cfg
            self.coordinator = Coordinator(cfg, self.run_dir)
            self.wait_for(self.launch_workers(), external)
        except BaseException:
            self.close()
            raise

    def launch_workers(self) -> list[str]:
        if self.ray_workers is not None:
            return self.ray_workers.start(self.coordinator, self.run_dir)
        return self.spawn_workers() if self.cfg.launch == "local" else []

    def wait_for(self, names: list[str], external: int) -> None:
        try:
            self.coordinator.wait_for_workers(names, external, self.cfg.register_timeout)
        except RuntimeError as err:
            if self.ray_workers is None:
                raise
            raise RuntimeError(f"{err}; {self.ray_workers.hint()}") from None

    def spawn_workers(self) -> list[str]:
        names = []
        coordinator = self.coordinator
        for name, device in zip(self.worker_names, worker_devices(self.cfg), strict=True):
            state_dir = self.run_dir / "workers" / name if self.run_dir is not None else None
            key_path, key = coordinator.private.key(name) if coordinator.curve else (None, None)
            process = spawn_worker(name, coordinator, device, self.cfg, state_dir, key_path)
            self.processes.append(process)
            coordinator.expect(name, process, key, state_dir)
            names.append(name)
        return names

    def make_pool(self, layer: str, experts: list[nn.Module], experts_cfg: ExpertsConfig,
                  placement: Placement | None = None) -> RemotePool:  # fmt: skip
        """Experts go where `placement` says, else to workers round-robin, continuing across layers."""
        workers = self.coordinator.registered_names()
        hosts = [workers[(self.next_slot + e) % len(workers)] for e in range(len(experts))]
        self.next_slot += len(experts)
        if placement is not None:
            hosts = list(placement.hosts)
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
            compute=experts_cfg,  # and its own `ComputeSettings`
            links=placement.links if placement is not None else None,
        )

    def host_alive(self, host: str) -> bool:
        self.coordinator.drain()
        return self.coordinator.is_alive(host)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.coordinator is not None:
            self.coordinator.close()
        stop_processes(self.processes)
        if self.ray_workers is not None:
            self.ray_workers.close()


register_transport("process", ProcessTransportConfig, ProcessTransport)
