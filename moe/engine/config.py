"""Typed configs: one dataclass per component, registered in Hydra's ConfigStore.

Every group option `configs/<group>/<name>.yaml` starts from the schema `<name>_schema` of its
group, so an unknown key or a wrong type fails when Hydra composes the config, naming the key.
Schemas come from the component registries (routers, transports, data sources), so a new
strategy is typed as soon as it registers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

import router
from experts.market import MarketConfig
from experts.modules import ExpertsConfig
from experts.transport import transport_configs
from moe.data import data_configs
from moe.incentives.audits import AuditConfig
from moe.incentives.ledger import LedgerConfig
from moe.incentives.poi import poi_configs
from moe.nn.model import ModelConfig


@dataclass
class TrainerConfig:
    max_steps: int = 300
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float = 1.0
    eval_every: int = 100
    log_every: int = 10
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    precision: str = "fp32"  # fp32 | bf16 (autocast; router math stays fp32)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    threads: int = 0  # torch intra-op threads in the trainer; 0 keeps torch's default
    progress: bool = True
    # freed memory stays in the process for the next step (experts/heap.py): no page faults on buffers
    # allocated anew every step, but the process never shrinks below its peak footprint
    keep_freed_memory: bool = True


@dataclass
class LoggerConfig:
    name: str = "jsonl"  # jsonl (metrics.jsonl only) | wandb (also to wandb)
    project: str = "poimoe"
    mode: str = "offline"  # wandb mode: offline unless the user says online
    tags: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    router: Any = MISSING
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    transport: Any = MISSING
    data: Any = MISSING
    poi: Any = None
    ledger: Any = None
    audit: AuditConfig = field(default_factory=AuditConfig)  # validators' audits (off: rate 0)
    market: Any = None  # compute marketplace (experts.market.MarketConfig); null: no market
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    resume: str | None = None  # a run dir (or checkpoint file) to continue from
    resume_incomplete: bool = False  # resume even from a checkpoint missing unreachable workers' experts
    run_dir: str | None = None  # where outputs go; default: Hydra's run dir
    name: str = "poimoe"  # run name, used for wandb and reports
    tags: list[str] = field(default_factory=list)
    report: Any = None  # what an experiment's section of the results page shows (moe.experiments.page_spec)


@dataclass
class GenerateConfig:
    """`eval.py ckpt=<run> generate.prompt=...`: sample text from a byte LM's checkpoint."""

    prompt: str | None = None  # the text to continue; set it to generate (quote it to keep spaces)
    tokens: int = 200  # bytes to generate
    temperature: float = 0.8  # 0: greedy (argmax); else softmax(logits / temperature)
    seed: int = 0  # the sampling draws come from (seed, "generate")


@dataclass
class EvalConfig:
    ckpt: str | None = None  # run dir or checkpoint file to evaluate
    compare: str | None = None  # a multirun dir to summarise into comparison.md
    report: str | None = None  # a folder of sweeps to turn into docs/results.md
    # ckpt=: folder for report.md and plots (default: the run dir); report=: the page (a .md path, or a
    # folder for results.md; default <report folder>/results.md)
    out: str | None = None
    num_val_batches: int | None = None
    generate: GenerateConfig = field(default_factory=GenerateConfig)  # ckpt=: also sample text


def register_configs() -> None:
    """Store every schema; idempotent, called when this module is imported."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalConfig)
    store.store(group="model", name="model_schema", node=ModelConfig)
    store.store(group="experts", name="experts_schema", node=ExpertsConfig)
    store.store(group="logger", name="logger_schema", node=LoggerConfig)
    store.store(group="ledger", name="ledger_schema", node=LedgerConfig)
    store.store(group="audit", name="audit_schema", node=AuditConfig)
    store.store(group="market", name="market_schema", node=MarketConfig)
    for name, strategy in router.strategies().items():
        store.store(group="router", name=f"{name}_schema", node=strategy.config_cls)
    for name, config_cls in transport_configs().items():
        store.store(group="transport", name=f"{name}_schema", node=config_cls)
    for name, config_cls in data_configs().items():
        store.store(group="data", name=f"{name}_schema", node=config_cls)
    for name, config_cls in poi_configs().items():
        store.store(group="poi", name=f"{name}_schema", node=config_cls)


def first_set(*values: Any) -> Any:
    """The first value that is not None (configs/hydra: `run_dir=` decides Hydra's run dir when set)."""
    return next((value for value in values if value is not None), None)


register_configs()
OmegaConf.register_new_resolver("poimoe.first_set", first_set, replace=True)
