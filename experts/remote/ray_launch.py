"""`transport.launch=ray`: the run's workers as Ray actors, placed by Ray resources, restarted by Ray.

Each actor (`WorkerActor`) runs the same `Worker` loop a spawned worker runs, in a thread it owns (the
thread dies with the actor's process), and connects back to the trainer's coordinator over tcp with
the key made for it by the coordinator, passed in its arguments. An actor asks Ray for
`transport.ray.num_cpus` and `num_gpus` ("one GPU per miner" is `num_gpus: 1`); Ray restarts a lost
one up to `max_restarts` times, and the restarted actor registers under the same name and key, so the
coordinator re-hosts its experts and the worker restores them from its own checkpoint in its state dir,
`<run_dir>/workers/<name>/` (a shared filesystem, as on one machine). `transport.ray.address`: None
starts an embedded Ray for the run and shuts it down at close; `auto`, `HOST:PORT` or `ray://…`
connects to an existing cluster, which is left running. Ray itself is an optional extra (`poimoe[ray]`)
imported only here, only when a run asks for it.

The key travels in the actor's arguments through Ray's control plane, which keeps them for restarts: a
Ray cluster is one trust domain. A run's keys admit nothing once its coordinator is gone.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from experts.errors import ConfigError
from experts.identity import Identity
from experts.remote.settings import WorkerLimits, launched_limits

if TYPE_CHECKING:
    from experts.remote.coordinator import Coordinator
    from experts.remote.spawn import ProcessTransportConfig

log = logging.getLogger(__name__)

NAMESPACE = "poimoe"  # actors are named poimoe-<trainer pid>-<worker name> in this namespace
EMBEDDED_OBJECT_STORE_BYTES = 128 * 2**20  # workers' data goes over ZeroMQ, not Ray's object store


@dataclass
class RayLaunchConfig:
    """Where and how `transport.launch=ray` places the workers (`transport.ray.*`)."""

    address: str | None = None  # None: an embedded Ray for the run; auto | HOST:PORT | ray://HOST:PORT
    num_cpus: float = 1.0  # CPUs Ray reserves per worker actor
    num_gpus: float = 0.0  # GPUs per worker actor; 1: one GPU per miner (its device is then cuda:0)
    max_restarts: int = 3  # times Ray restarts a lost worker actor; -1: without limit


def check_ray_config(cfg: RayLaunchConfig, launch: str) -> None:
    """Ray options only with `launch=ray`, and within their ranges; errors name the bad value."""
    if launch != "ray":
        changed = [f.name for f in fields(cfg) if getattr(cfg, f.name) != getattr(RayLaunchConfig(), f.name)]
        if changed:
            raise ConfigError(
                f"transport.ray.{changed[0]}={getattr(cfg, changed[0])!r} is set but "
                f"transport.launch={launch!r}; Ray options need transport.launch=ray"
            )
        return
    if cfg.num_cpus < 0 or cfg.num_gpus < 0:
        raise ConfigError(
            f"transport.ray.num_cpus={cfg.num_cpus:g}, num_gpus={cfg.num_gpus:g}: must not be negative"
        )
    if cfg.max_restarts < -1:
        raise ConfigError(f"transport.ray.max_restarts={cfg.max_restarts}; valid: -1 (no limit) or ≥ 0")
    if cfg.address is not None and not cfg.address.strip():
        raise ConfigError(
            "transport.ray.address='' ; valid: null (embedded), auto, HOST:PORT, ray://HOST:PORT"
        )


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "transport.launch=ray needs Ray: pip install 'poimoe[ray]' (or pip install -e '.[ray]')"
        ) from None
    return ray


@dataclass(frozen=True)
class ActorArgs:
    """Everything a worker actor needs, in its constructor's arguments (so a restart gets them again)."""

    coordinator: str  # tcp://HOST:PORT
    name: str
    threads: int
    state_dir: str | None
    key_seed: bytes | None  # the worker's key (Ed25519 seed), made for it by the coordinator
    coordinator_key: str | None  # the coordinator's hotkey
    limits: WorkerLimits
    log_level: str


class WorkerActor:
    """A Ray actor that runs one `Worker` loop in a thread it owns; made remote by `RayWorkers`."""

    def __init__(self, args: ActorArgs):
        self.device = "cuda:0" if torch.cuda.is_available() and _gpu_ids() else "cpu"
        torch.set_num_threads(args.threads)
        _log_to_state_dir(args)
        context = _ray().get_runtime_context()
        log.info("worker %s in a Ray actor on node %s (restarted: %s)", args.name, context.get_node_id(),
                 context.was_current_actor_reconstructed)  # fmt: skip
        self.thread = threading.Thread(target=_serve, args=(args, self.device), name=args.name, daemon=True)
        self.thread.start()

    def pid(self) -> int:
        return os.getpid()


def _ray():
    import ray  # in an actor, Ray is there

    return ray


def _gpu_ids() -> list:
    return _ray().get_gpu_ids()


def _log_to_state_dir(args: ActorArgs) -> None:
    """Worker logs go to `<state dir>/worker.log`, as a spawned worker's do."""
    if args.state_dir is None:
        return
    Path(args.state_dir).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(args.state_dir) / "worker.log")
    handler.setFormatter(logging.Formatter(f"%(asctime)s worker[{args.name}] %(levelname)s %(message)s"))
    for name in ("experts", "moe", "router"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(args.log_level)


def _serve(args: ActorArgs, device: str) -> None:
    """The worker loop; a worker that fails ends its actor's process, so Ray restarts it."""
    from experts.remote.worker import Worker

    try:
        key = Identity.from_seed(args.key_seed) if args.key_seed is not None else None
        worker = Worker(
            args.coordinator, name=args.name, device=device, threads=args.threads, state_dir=args.state_dir,
            limits=args.limits, key=key, coordinator_key=args.coordinator_key,
        )  # fmt: skip
        worker.run()
    except BaseException:
        log.exception("worker %s failed; its actor exits for Ray to restart it", args.name)
        logging.shutdown()
        os._exit(1)
    log.info("worker %s stopped; its actor waits to be killed", args.name)


class RayWorkers:
    """The run's side of `launch=ray`: Ray connected (or embedded), one actor per worker, all ended by
    `close()`. A process that already called `ray.init` lends its connection and keeps it."""

    def __init__(self, cfg: ProcessTransportConfig):
        self.ray = import_ray()
        self.cfg = cfg
        self.actors: dict[str, object] = {}
        self.remote_class = self.ray.remote(WorkerActor)
        self.connected_here = not self.ray.is_initialized()
        if self.connected_here:
            self.ray.init(**self.init_kwargs())
        where = "an embedded Ray" if cfg.ray.address is None else f"Ray at {cfg.ray.address}"
        log.info("launch=ray: %d worker actors on %s (%s)", cfg.workers, where, self.ray.cluster_resources())

    def init_kwargs(self) -> dict:
        ray_cfg = self.cfg.ray
        common = {"namespace": NAMESPACE, "log_to_driver": False}
        if ray_cfg.address is not None:
            return {"address": ray_cfg.address, **common}
        # an embedded Ray just large enough for the workers
        num_gpus = math.ceil(self.cfg.workers * ray_cfg.num_gpus) if ray_cfg.num_gpus else 0
        return {
            "address": "local",  # never an existing instance this machine happens to run
            "num_cpus": max(1, math.ceil(self.cfg.workers * ray_cfg.num_cpus)),
            "num_gpus": num_gpus,
            "object_store_memory": EMBEDDED_OBJECT_STORE_BYTES,
            "include_dashboard": False,
            **common,
        }

    def coordinator_config(self, cfg: ProcessTransportConfig) -> ProcessTransportConfig:
        """Actors connect over tcp; on a cluster, to this node's address unless `transport.host` says."""
        host = cfg.host
        if cfg.ray.address is not None and host == "127.0.0.1":
            host = self.ray.util.get_node_ip_address()
        if cfg.address != "tcp":
            log.info("launch=ray: the coordinator listens on tcp (transport.address=%s ignored)", cfg.address)
        return replace(cfg, address="tcp", host=host)

    def start(self, coordinator: Coordinator, run_dir: Path | None) -> list[str]:
        """One actor per worker, each bound to its name and key in the coordinator before it starts."""
        limits = launched_limits(self.cfg)
        names = [f"w{i}" for i in range(self.cfg.workers)]
        for name in names:
            state_dir = run_dir / "workers" / name if run_dir is not None else None
            key = coordinator.private.key(name)[1] if coordinator.curve else None
            coordinator.expect(name, None, key, state_dir)
            args = ActorArgs(
                coordinator=coordinator.connect_address, name=name, threads=self.cfg.threads,
                state_dir=str(state_dir) if state_dir is not None else None,
                key_seed=key.seed if key is not None else None,
                coordinator_key=coordinator.identity.hotkey if key is not None else None,
                limits=limits, log_level=logging.getLevelName(log.getEffectiveLevel()),
            )  # fmt: skip
            self.actors[name] = self.actor_options(name).remote(args)
        return names

    def actor_options(self, name: str):
        ray_cfg = self.cfg.ray
        return self.remote_class.options(
            num_cpus=ray_cfg.num_cpus,
            num_gpus=ray_cfg.num_gpus,
            max_restarts=ray_cfg.max_restarts,
            namespace=NAMESPACE,
            name=f"poimoe-{os.getpid()}-{name}",
        )

    def hint(self) -> str:
        """What to check when actors did not register: usually resources Ray cannot place."""
        ray_cfg = self.cfg.ray
        return (
            f"each worker actor asks Ray for num_cpus={ray_cfg.num_cpus:g}, num_gpus={ray_cfg.num_gpus:g}; "
            f"Ray has {self.ray.available_resources()} available"
        )

    def close(self) -> None:
        """Kill every actor (no restart) and end the Ray connection this run made. A kill that fails
        (an actor whose creation Ray is still cancelling under load) is logged, not raised: close runs
        while a failed start unwinds, and must neither hide that error nor leave the others running."""
        for name, actor in self.actors.items():
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception as err:
                log.warning("could not kill worker actor %s: %s", name, err)
        self.actors.clear()
        if self.connected_here and self.ray.is_initialized():
            self.ray.shutdown()
