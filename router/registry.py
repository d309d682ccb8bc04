"""Routing strategies by registry name: `build("topk", d_model, num_experts, top_k=2)`.

Each strategy registers a typed config dataclass (a subclass of `RouterConfig`) next to its module,
so an unknown option or a wrong type fails when the router is built, naming the option.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import MISSING
from torch import nn

from router.errors import ConfigError
from router.typed_config import choose, typed_config


@dataclass
class RouterConfig:
    """Options every learned router shares; strategies extend it."""

    name: str = MISSING
    aux_loss_weight: float = 0.0  # Switch load-balancing loss α·E·Σ f_i·P_i; 0 turns it off
    z_loss_weight: float = 0.0  # ST-MoE router z-loss coefficient; 0 turns it off


@dataclass(frozen=True)
class Strategy:
    name: str
    config_cls: type[RouterConfig]
    factory: Callable[[int, int, RouterConfig], nn.Module]


_STRATEGIES: dict[str, Strategy] = {}


def register(name: str, config_cls: type[RouterConfig]):
    """Class decorator: make a router module buildable as `name` with options typed by `config_cls`."""

    def wrap(module_cls):
        if name in _STRATEGIES:
            raise ValueError(f"router '{name}' is registered twice")
        _STRATEGIES[name] = Strategy(name, config_cls, module_cls)
        return module_cls

    return wrap


def names() -> list[str]:
    return sorted(_STRATEGIES)


def strategies() -> dict[str, Strategy]:
    return dict(_STRATEGIES)


def lookup(name: str) -> Strategy:
    return choose(_STRATEGIES, name, "router")


def make_config(name: str, **options) -> RouterConfig:
    """Typed config for `name` from keyword options; an unknown option or a wrong type names it."""
    strategy = lookup(name)
    valid = {f.name for f in dataclasses.fields(strategy.config_cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {unknown} for router '{name}'; valid options: {sorted(valid - {'name'})}"
        )
    return typed_config(strategy.config_cls, {**options, "name": name}, "router")


def build(name: str, d_model: int, num_experts: int, **options) -> nn.Module:
    """Build router `name` for `num_experts` experts on `d_model`-wide tokens."""
    config = make_config(name, **options)
    return lookup(name).factory(d_model, num_experts, config)
