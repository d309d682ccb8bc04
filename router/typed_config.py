"""One way to turn a config node into its typed dataclass, for every package (router is the lowest).

`typed_choice(classes, node, "router", "router")` picks the dataclass the node's `name` names from a
registry (an unknown name lists the valid ones), then `typed_config(Cls, node, "router")`, which accepts an OmegaConf node, a plain mapping or an instance of
the dataclass, and returns an instance whose fields have the schema's types. An unknown key or a
value of the wrong type raises `ConfigError` naming the full key (`router.top_k`) and the reason.
The dataclass is the single source of defaults and types.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from router.errors import ConfigError

T = TypeVar("T")


def plain(cfg: Any) -> dict[str, Any]:
    """A plain, resolved dict of an OmegaConf node, a dataclass instance or a mapping."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise ConfigError(f"expected a config mapping, got {type(cfg).__name__}")


def choose(options: Mapping[str, T], name: object, kind: str) -> T:
    """`options[name]`; an unknown name is a ConfigError listing the valid ones."""
    if name not in options:
        raise ConfigError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(options))}")
    return options[name]


def typed_choice(config_classes: Mapping[str, type], cfg: Any, prefix: str, kind: str) -> Any:
    """The typed config of the registered option `cfg.name` names (see `choose` and `typed_config`)."""
    if isinstance(cfg, tuple(config_classes.values())):
        return cfg
    return typed_config(choose(config_classes, plain(cfg).get("name"), kind), cfg, prefix)


def typed_config(config_cls: type[T], cfg: Any, prefix: str) -> T:
    """`cfg` as a `config_cls` instance; errors name the key as `<prefix>.<key>`."""
    if isinstance(cfg, config_cls):
        return cfg
    try:
        merged = OmegaConf.merge(OmegaConf.structured(config_cls), plain(cfg))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as error:
        key = error.full_key or getattr(error, "key", None) or "?"
        reason = str(error).splitlines()[0]
        raise ConfigError(f"{prefix}.{key}: {reason}") from None
