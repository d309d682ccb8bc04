"""Transports: where a run's experts live. Chosen by registry name (`transport=local|process`).

A transport is opened once per run and makes one `ExpertPool` per MoE layer; a process transport
shares its workers across layers, which is why pools come from a transport and not on their own.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from experts.errors import ConfigError
from experts.modules import ExpertsConfig
from experts.network import FaultPolicy, LinkSpec, NetworkConfig, VirtualNetwork, network_is_ideal
from experts.pool import ExpertPool, LocalPool
from router.typed_config import typed_config


@dataclass
class TransportConfig:
    name: str = "local"


@dataclass
class LocalTransportConfig(FaultPolicy, TransportConfig):
    """Experts in this process. The config is its own `FaultPolicy` (the fields it inherits), shared
    with `transport=process`; here the policy acts on the simulated `network`, in virtual time. The
    default, an ideal network, skips the simulation altogether."""

    network: NetworkConfig = field(default_factory=NetworkConfig)  # simulated links per expert


@dataclass(frozen=True)
class Placement:
    """Where a layer's experts live under a market: per expert, its provider's link and host (worker name)."""

    links: list[LinkSpec]
    hosts: list[str]


class Transport:
    """Makes pools for MoE layers; `close()` releases whatever the transport started."""

    def make_pool(self, layer: str, experts: list[nn.Module], experts_cfg: ExpertsConfig,
                  placement: Placement | None = None) -> ExpertPool:  # fmt: skip
        """The layer's pool; with a `placement` (a market's leases) each expert sits behind its
        provider's link, on its provider's worker."""
        raise NotImplementedError

    def host_alive(self, host: str) -> bool:
        """Whether the worker named `host` is alive (simulated hosts always are)."""
        return True

    def close(self) -> None:
        pass


class LocalTransport(Transport):
    def __init__(self, cfg: LocalTransportConfig, *, device: torch.device, run_dir: Path | None, seed: int,
                 hosts: list[str] | None = None):  # fmt: skip
        """`hosts` (a market's provider workers) need no processes here: they are simulated links."""
        self.cfg, self.device, self.seed = cfg, device, seed

    def make_pool(self, layer: str, experts: list[nn.Module], experts_cfg: ExpertsConfig,
                  placement: Placement | None = None) -> ExpertPool:  # fmt: skip
        pool = LocalPool(
            experts,
            experts_cfg,  # the experts config is its own `OptimizerSettings`
            policy=self.cfg,  # and the transport config its own `FaultPolicy`
            network=self.virtual_network(layer, len(experts), placement),
            device=self.device,
            compute=experts_cfg,  # and its own `ComputeSettings`
        )
        if placement is not None:
            pool.hosts = list(placement.hosts)
        return pool

    def virtual_network(
        self, layer: str, num_experts: int, placement: Placement | None = None
    ) -> VirtualNetwork | None:
        if placement is None and network_is_ideal(self.cfg.network):
            return None
        network = VirtualNetwork(self.cfg.network, self.cfg, num_experts, layer=layer, seed=self.seed)
        if placement is not None:
            for e, (link, host) in enumerate(zip(placement.links, placement.hosts, strict=True)):
                network.move_expert(e, link, host)
        return network


TransportFactory = Callable[..., Transport]
_TRANSPORTS: dict[str, tuple[type[TransportConfig], TransportFactory]] = {
    "local": (LocalTransportConfig, LocalTransport)
}


BUILTIN_TRANSPORT_MODULES = ("experts.remote.spawn",)  # each registers its transports when imported


def _import_builtin_transports() -> None:
    for module in BUILTIN_TRANSPORT_MODULES:
        importlib.import_module(module)


def register_transport(name: str, config_cls: type[TransportConfig], factory: TransportFactory) -> None:
    _TRANSPORTS[name] = (config_cls, factory)


def transport_configs() -> dict[str, type[TransportConfig]]:
    _import_builtin_transports()
    return {name: config_cls for name, (config_cls, _) in _TRANSPORTS.items()}


def open_transport(
    cfg, *, device: torch.device, run_dir: Path | None, seed: int, hosts: list[str] | None = None
) -> Transport:
    """The transport `cfg.name` names, given its config as its typed dataclass; `hosts`: the workers a
    market's providers serve from (transport=process starts one per name)."""
    _import_builtin_transports()
    if cfg.name not in _TRANSPORTS:
        raise ConfigError(
            f"unknown transport '{cfg.name}'; valid transports: {', '.join(sorted(_TRANSPORTS))}"
        )
    config_cls, factory = _TRANSPORTS[cfg.name]
    typed = typed_config(config_cls, cfg, "transport")
    return factory(typed, device=device, run_dir=run_dir, seed=seed, hosts=hosts)
