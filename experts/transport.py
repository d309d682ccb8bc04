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
from experts.network import NetworkConfig, VirtualNetwork, fault_policy, network_is_ideal
from experts.pool import ExpertPool, LocalPool


@dataclass
class TransportConfig:
    name: str = "local"


@dataclass
class LocalTransportConfig(TransportConfig):
    """Experts in this process. The fault semantics (`experts.network.FaultPolicy`) are shared with
    `transport=process`; here they act on the simulated `network`, in virtual time. The default, an
    ideal network, skips the simulation altogether."""

    forward_timeout: float = 10.0  # seconds a forward call waits for any expert
    backward_timeout: float = 10.0  # seconds a backward call waits for input gradients
    k_min: int = 1  # answers per token before the straggler cut-off starts
    straggler_cutoff: float = 1.0  # seconds to wait for the rest once every token has k_min answers
    max_output_norm: float = 1e4  # reject outputs whose per-token L2 norm is larger; 0 disables
    backoff_base: int = 1  # calls an expert sits out after its first consecutive failure (doubles)
    backoff_max: int = 64  # most calls an expert sits out; 0 base disables the back-off
    network: NetworkConfig = field(default_factory=NetworkConfig)


class Transport:
    """Makes pools for MoE layers; `close()` releases whatever the transport started."""

    def make_pool(self, layer: str, experts: list[nn.Module], experts_cfg: ExpertsConfig) -> ExpertPool:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalTransport(Transport):
    def __init__(self, cfg: TransportConfig, *, device: torch.device, run_dir: Path | None, seed: int):
        self.cfg, self.device, self.seed = cfg, device, seed

    def make_pool(self, layer: str, experts: list[nn.Module], experts_cfg: ExpertsConfig) -> ExpertPool:
        return LocalPool(
            experts,
            lr=experts_cfg.lr,
            weight_decay=experts_cfg.weight_decay,
            grad_clip=experts_cfg.grad_clip,
            device=self.device,
            network=self.virtual_network(layer, len(experts)),
            max_output_norm=getattr(self.cfg, "max_output_norm", 0.0),
        )

    def virtual_network(self, layer: str, num_experts: int) -> VirtualNetwork | None:
        network = getattr(self.cfg, "network", None)
        if network_is_ideal(network):
            return None
        link_seed = f"{self.seed}/{network.seed}"
        return VirtualNetwork(network, fault_policy(self.cfg), num_experts, layer=layer, link_seed=link_seed)


TransportFactory = Callable[..., Transport]
_TRANSPORTS: dict[str, tuple[type[TransportConfig], TransportFactory]] = {
    "local": (LocalTransportConfig, LocalTransport)
}


BUILTIN_TRANSPORT_MODULES = ("experts.remote.client",)  # each registers its transports when imported


def _import_builtin_transports() -> None:
    for module in BUILTIN_TRANSPORT_MODULES:
        importlib.import_module(module)


def register_transport(name: str, config_cls: type[TransportConfig], factory: TransportFactory) -> None:
    _TRANSPORTS[name] = (config_cls, factory)


def transport_configs() -> dict[str, type[TransportConfig]]:
    _import_builtin_transports()
    return {name: config_cls for name, (config_cls, _) in _TRANSPORTS.items()}


def open_transport(cfg, *, device: torch.device, run_dir: Path | None, seed: int) -> Transport:
    _import_builtin_transports()
    if cfg.name not in _TRANSPORTS:
        raise ConfigError(
            f"unknown transport '{cfg.name}'; valid transports: {', '.join(sorted(_TRANSPORTS))}"
        )
    return _TRANSPORTS[cfg.name][1](cfg, device=device, run_dir=run_dir, seed=seed)
