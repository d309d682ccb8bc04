"""Build a run from its config: data → model (router, expert pools) → optimizer → PoI scorer.

`Run` holds everything a training run needs so the loop's helpers take one argument.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from omegaconf import DictConfig, OmegaConf

import router
from experts.behaviours import parse_behaviours
from experts.market import LeaseBook, build_lease_book
from experts.modules import build_experts
from experts.transport import Placement, Transport, open_transport
from moe.data import build_data
from moe.engine.market_routing import MarketRouting, market_routing, with_market_policy
from moe.engine.metrics import MetricsLogger
from moe.errors import ConfigError
from moe.incentives.audits import Auditor, as_audit_config, build_auditor
from moe.incentives.ledger import RewardLedger
from moe.incentives.poi import PoIScorer, build_scorer
from moe.nn.layer import MoELayer
from moe.nn.model import MoEModel, build_model
from router.seeds import derive_seed

FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch 2.13 has a fused AdamW kernel


@dataclass
class Run:
    """Everything a training run holds, so the loop's helpers take one argument."""

    cfg: DictConfig
    run_dir: Path
    accelerator: Accelerator
    data: object
    model: MoEModel
    transport: Transport
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    logger: MetricsLogger | None = None
    step: int = 0
    scorer: PoIScorer | None = None  # per-expert PoI and its routing feedback (poi=null: none)
    ledger: RewardLedger | None = None  # rewards by Yuma consensus (ledger=null: none)
    auditor: Auditor | None = None  # validators' audits of expert calls (audit.rate=0: none)
    sim_seconds: float = 0.0  # wall + virtual network seconds of the training steps so far (checkpointed)
    market: LeaseBook | None = None  # leases of experts to providers (market=null: none)
    market_routing: MarketRouting | None = None  # routing by expected latency and price (market=null: none)
    charges: list = field(default_factory=list)  # the latest step's compute charges (market)

    @property
    def layers(self) -> list[MoELayer]:
        return self.model.moe_layers()

    def autocast(self):
        return (
            self.accelerator.autocast() if self.cfg.trainer.precision == "bf16" else contextlib.nullcontext()
        )


def trunk_optimizer(model: torch.nn.Module, trainer_cfg: DictConfig, device: torch.device):
    """The trunk's AdamW, fused where torch has the kernel: on CPU its default is a Python loop over the
    parameters (1.7 vs 0.5 ms a step at the default size). `load_state_dict` takes each param group's
    settings from the checkpoint, `fused` included, so a hook puts this run's choice back: a checkpoint
    written before, or on another device, does not choose the kernel."""
    fused = device.type in FUSED_ADAMW_DEVICES
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=trainer_cfg.lr,
        weight_decay=trainer_cfg.weight_decay,
        betas=(0.9, 0.95),
        fused=fused,
    )

    def keep_kernel_choice(loaded: torch.optim.Optimizer) -> None:
        for group in loaded.param_groups:
            group["fused"], group["foreach"] = fused, None

    optimizer.register_load_state_dict_post_hook(keep_kernel_choice)
    return optimizer


def build_run(cfg: DictConfig, run_dir: Path, data=None) -> Run:
    """The run `cfg` describes, in `run_dir`; `data` when given is `cfg.data`'s source, already built."""
    # Sweeps run many jobs in one process; each job may ask for a different precision or device.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(
        cpu=cfg.trainer.device == "cpu",
        mixed_precision="bf16" if cfg.trainer.precision == "bf16" else "no",
    )
    if cfg.trainer.precision not in ("fp32", "bf16"):
        raise ConfigError(f"trainer.precision={cfg.trainer.precision!r}; valid: fp32, bf16")
    data = build_data(cfg.data, seed=cfg.seed) if data is None else data
    routing = market_routing(cfg.get("market"))
    market = build_lease_book(cfg.get("market"), [], cfg.experts.num, cfg.seed)
    hosts = market.worker_names if market is not None else None
    transport = open_transport(
        with_market_policy(cfg.transport, routing),
        device=accelerator.device,
        run_dir=run_dir,
        seed=cfg.seed,
        hosts=hosts,
    )
    try:
        model = build_model(cfg.model, data, moe_factory(cfg, transport, market))
        optimizer = trunk_optimizer(model, cfg.trainer, accelerator.device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lr_schedule(cfg.trainer))
        model, optimizer = accelerator.prepare(model, optimizer)
        scorer = build_scorer(
            cfg.get("poi"), accelerator.unwrap_model(model), data.val_batches(), seed=cfg.seed
        )
        layers = accelerator.unwrap_model(model).moe_layers()
        auditor = build_auditor(as_audit_config(cfg.get("audit")), layers, seed=cfg.seed)
    except BaseException:
        transport.close()
        raise
    return Run(
        cfg,
        run_dir,
        accelerator,
        data,
        model,
        transport,
        optimizer,
        scheduler,
        scorer=scorer,
        auditor=auditor,
        market=market,
        market_routing=routing,
    )


def moe_factory(cfg: DictConfig, transport: Transport, market: LeaseBook | None = None):
    """Builds each MoE layer: its router from the registry and its pool from the transport, with its
    experts placed on the providers the market's initial auction chose."""

    def make(layer_name: str, d_model: int) -> MoELayer:
        layer_router = router.build(
            **router_options(cfg.router, layer_name), d_model=d_model, num_experts=cfg.experts.num
        )
        experts = build_experts(cfg.experts, d_model)
        placement = Placement(*market.placement(layer_name)) if market is not None else None
        pool = transport.make_pool(layer_name, experts, cfg.experts, placement)
        pool.set_behaviours(
            parse_behaviours(cfg.experts.behaviours, cfg.experts.num), seed=cfg.seed, layer=layer_name
        )
        return MoELayer(layer_name, layer_router, pool)

    return make


def router_options(router_cfg, layer_name: str) -> dict:
    """The router's options; a seeded router gets a per-layer seed so layers draw different noise."""
    options = OmegaConf.to_container(router_cfg, resolve=True)
    if "seed" in options:
        options["seed"] = derive_seed(options["seed"], layer_name)
    return options


def lr_schedule(trainer_cfg):
    """Linear warmup, then cosine decay to 10 % of the peak learning rate."""
    warmup, total = max(trainer_cfg.warmup_steps, 0), max(trainer_cfg.max_steps, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
