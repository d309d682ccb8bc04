"""Transports: where a run's experts live. Chosen by registry name (`transport=local|process`).

A transport is opened once per run and makes one `ExpertPool` per MoE layer; a process transport
shares its workers across layers, which is why pools come from a transport and not on their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from experts.modules import ExpertsConfig
from experts.pool import ExpertPool, LocalPool
from moe.errors import ConfigError


@dataclass
class TransportConfig:
    name: str = "local"


class Transport:
    """Makes pools for MoE layers; `close()` releases whatever the transport started."""

    def make_pool(self, layer: str, experts: list[nn.Module], experts_cfg: ExpertsConfig) -> ExpertPool:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalTransport(Transport):
    def __init__(self, cfg: TransportConfig, *, device: torch.device, run_dir: Path | None, seed: int):
        self.device = device

    def make_pool(self, layer: str, experts: list[nn.Module], experts_cfg: ExpertsConfig) -> ExpertPool:
        return LocalPool(
            experts,
            lr=experts_cfg.lr,
            weight_decay=experts_cfg.weight_decay,
            grad_clip=experts_cfg.grad_clip,
            device=self.device,
        )


TransportFactory = Callable[..., Transport]
_TRANSPORTS: dict[str, tuple[type[TransportConfig], TransportFactory]] = {"local": (TransportConfig, LocalTransport)}


def register_transport(name: str, config_cls: type[TransportConfig], factory: TransportFactory) -> None:
    _TRANSPORTS[name] = (config_cls, factory)


def transport_configs() -> dict[str, type[TransportConfig]]:
    return {name: config_cls for name, (config_cls, _) in _TRANSPORTS.items()}


def open_transport(cfg, *, device: torch.device, run_dir: Path | None, seed: int) -> Transport:
    if cfg.name not in _TRANSPORTS:
        raise ConfigError(f"unknown transport '{cfg.name}'; valid transports: {', '.join(sorted(_TRANSPORTS))}")
    return _TRANSPORTS[cfg.name][1](cfg, device=device, run_dir=run_dir, seed=seed)
