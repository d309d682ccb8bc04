"""What the training loop gets from data, and the registry that builds a source from `data.name`.

Sources register themselves: `streams` (the byte corpora `mixture` and `text`) and `clusters`.
Every batch is a pure function of (seed, step), so a resumed run sees the same batches as an
uninterrupted one.

Shape legend: B batch, T sequence length, I input dim, O output dim, G domains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from moe.errors import ConfigError
from router.typed_config import typed_choice


@dataclass(frozen=True)
class Batch:
    """One batch. lm: `inputs`/`targets` are long [B, T] byte ids, targets the inputs shifted by one byte.
    regression: float [B, I] inputs and [B, O] targets. `domain_B` indexes `DataSource.domains`."""

    inputs: torch.Tensor
    targets: torch.Tensor
    domain_B: torch.Tensor


class DataSource(Protocol):
    """What the training loop needs from data: batches as pure functions of the step, and a fixed val set."""

    task: str
    domains: list[str]
    vocab_size: int
    input_dim: int
    output_dim: int

    def train_batch(self, step: int) -> Batch: ...

    def val_batches(self) -> list[Batch]: ...


DataBuilder = Callable[[Any, int], DataSource]
_REGISTRY: dict[str, tuple[type, DataBuilder]] = {}


def register_data(name: str, config_cls: type) -> Callable[[DataBuilder], DataBuilder]:
    """Register `builder(typed_cfg, seed)` under `name`, with the dataclass its config is checked against."""

    def decorator(builder: DataBuilder) -> DataBuilder:
        _REGISTRY[name] = (config_cls, builder)
        return builder

    return decorator


def data_configs() -> dict[str, type]:
    """Config dataclass per registered data name, for registering in Hydra's ConfigStore."""
    return {name: config_cls for name, (config_cls, _) in sorted(_REGISTRY.items())}


def build_data(cfg: Any, seed: int) -> DataSource:
    """Build the data source named by `cfg.name` (a DictConfig, a mapping or one of the config dataclasses)."""
    typed = typed_choice(data_configs(), cfg, "data", "data source")
    _, builder = _REGISTRY[typed.name]
    return builder(typed, seed)


def require(ok: bool, key: str, value: Any, expectation: str) -> None:
    if not ok:
        raise ConfigError(f"data.{key}={value!r} is invalid: {expectation}")


def check_batching(cfg: Any) -> None:
    require(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "must be at least 1")
    require(cfg.num_val_batches >= 1, "num_val_batches", cfg.num_val_batches, "must be at least 1")


def check_byte_config(cfg: Any) -> None:
    check_batching(cfg)
    require(cfg.seq_len >= 1, "seq_len", cfg.seq_len, "must be at least 1")
    require(0 < cfg.val_fraction < 1, "val_fraction", cfg.val_fraction, "must be between 0 and 1")


def balanced_domains_B(first_sequence: int, batch_size: int, num_domains: int) -> torch.Tensor:
    """Domain of each sequence, round-robin over the global sequence index: every batch is balanced to
    within one sequence and consecutive batches even out exactly."""
    return (first_sequence + torch.arange(batch_size)) % num_domains
