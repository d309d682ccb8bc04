"""`train(cfg) -> dict`: data → model → router → pool → (scorer, ledger) → logger, then the loop.

Each step: forward (router → DispatchPlan → pool → combine), loss = task loss + aux losses,
backward, then the trunk optimizer steps the trunk and router while every expert's owner steps
its own experts (`pool.step(step)`), exactly as a remote miner would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform
import random
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

import router
from experts.behaviours import parse_behaviours
from experts.modules import build_experts
from experts.transport import Transport, open_transport
from moe.data.corpus import build_data
from moe.engine.checkpoint import load_checkpoint, run_dir_of, save_checkpoint
from moe.engine.metrics import MetricsLogger, read_metrics, truncate_after
from moe.engine.validation import evaluate, specialisation_metrics, write_routing_tables
from moe.errors import ConfigError
from moe.incentives.ledger.writer import RewardLedger
from moe.incentives.poi.scorer import PoIScorer, build_scorer
from moe.incentives.rewards import open_run_ledger, reward_metrics, score_view, step_failures
from moe.nn.layer import MoELayer
from moe.nn.model import MoEModel, build_model

log = logging.getLogger(__name__)


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

    @property
    def layers(self) -> list[MoELayer]:
        return self.model.moe_layers()

    def autocast(self):
        return self.accelerator.autocast() if self.cfg.trainer.precision == "bf16" else contextlib.nullcontext()


def train(cfg: DictConfig) -> dict:
    """Train from a composed config; returns the final summary (also written to summary.json)."""
    resume_state = None
    if cfg.resume:
        resume_path, resume_state = load_checkpoint(cfg.resume)
        log.info("resuming from %s (step %d)", resume_path, resume_state["step"])
    run_dir = run_dir_of(resume_path) if resume_state is not None else resolve_run_dir(cfg)
    seed_everything(cfg.seed)
    threads = trainer_threads(cfg)
    if threads > 0:
        torch.set_num_threads(threads)
    run = build_run(cfg, run_dir)
    try:
        if resume_state is not None:
            restore(run, resume_state)
            truncate_after(run_dir, run.step)
        run.ledger = open_run_ledger(run, resume_step=run.step if resume_state is not None else None)
        write_run_info(run)
        run.logger = MetricsLogger(
            run_dir, cfg.logger, run_name=cfg.name, config=resolved(cfg), resume=resume_state is not None
        )
        return loop(run)
    finally:
        if run.logger is not None:
            run.logger.close()
        if run.ledger is not None:
            run.ledger.close()
        run.transport.close()


def resolve_run_dir(cfg: DictConfig) -> Path:
    """`run_dir` when set, else Hydra's output dir (a resumed run continues in its own dir instead)."""
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
    else:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            raise ConfigError("run_dir is not set and no Hydra run is active: pass run_dir=<folder>")
        run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def trainer_threads(cfg: DictConfig) -> int:
    """`trainer.threads` when set; with local worker processes, the cores they leave free (at least 1),
    because oversubscribed cores make every parallel op wait for a descheduled thread; else 0 (torch's
    default)."""
    if cfg.trainer.threads > 0:
        return cfg.trainer.threads
    if cfg.transport.name != "process":
        return 0
    return max(1, _cpu_count() - cfg.transport.workers * cfg.transport.threads)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_run(cfg: DictConfig, run_dir: Path) -> Run:
    # Sweeps run many jobs in one process; each job may ask for a different precision or device.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(
        cpu=cfg.trainer.device == "cpu",
        mixed_precision="bf16" if cfg.trainer.precision == "bf16" else "no",
    )
    if cfg.trainer.precision not in ("fp32", "bf16"):
        raise ConfigError(f"trainer.precision={cfg.trainer.precision!r}; valid: fp32, bf16")
    data = build_data(cfg.data, seed=cfg.seed)
    transport = open_transport(cfg.transport, device=accelerator.device, run_dir=run_dir, seed=cfg.seed)
    try:
        model = build_model(cfg.model, data, moe_factory(cfg, transport))
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay, betas=(0.9, 0.95)
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lr_schedule(cfg.trainer))
        model, optimizer = accelerator.prepare(model, optimizer)
        scorer = build_scorer(cfg.get("poi"), accelerator.unwrap_model(model), data.val_batches())
    except BaseException:
        transport.close()
        raise
    return Run(cfg, run_dir, accelerator, data, model, transport, optimizer, scheduler, scorer=scorer)


def moe_factory(cfg: DictConfig, transport: Transport):
    """Builds each MoE layer: its router from the registry and its pool from the transport."""

    def make(layer_name: str, d_model: int) -> MoELayer:
        layer_router = router.build(**router_options(cfg.router, layer_name), d_model=d_model, num_experts=cfg.experts.num)
        experts = build_experts(cfg.experts, d_model)
        pool = transport.make_pool(layer_name, experts, cfg.experts)
        pool.set_behaviours(parse_behaviours(cfg.experts.behaviours, cfg.experts.num), seed=cfg.seed, layer=layer_name)
        return MoELayer(layer_name, layer_router, pool)

    return make


def router_options(router_cfg, layer_name: str) -> dict:
    """The router's options; a seeded router gets a per-layer seed so layers draw different noise."""
    options = OmegaConf.to_container(router_cfg, resolve=True)
    if "seed" in options:
        options["seed"] += zlib.crc32(layer_name.encode()) % 100_003
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


def loop(run: Run) -> dict:
    cfg = run.cfg.trainer
    started = time.perf_counter()
    if run.step == 0:
        run.logger.log(0, validate(run))
    window, simulated = Throughput(), Throughput()
    bar = tqdm(total=cfg.max_steps, initial=run.step, disable=not cfg.progress, desc="train", unit="step")
    last_val: dict = {}
    while run.step < cfg.max_steps:
        run.step += 1
        step_metrics = train_step(run)
        tokens, seconds = step_metrics.pop("tokens"), step_metrics.pop("seconds")
        window.add(tokens, seconds)
        simulated.add(tokens, seconds + step_metrics.pop("virtual_seconds"))
        if run.ledger is not None:  # before any checkpoint of this step, so resume finds the block
            run.ledger.after_step(run.step, score_view(run), step_failures(run))
        bar.update(1)
        bar.set_postfix(loss=f"{step_metrics['train/loss']:.3f}", tok_s=f"{window.rate():.0f}")
        if run.step % cfg.log_every == 0 or run.step == cfg.max_steps:
            poi_metrics = run.scorer.metrics() if run.scorer is not None else {}
            rewards = reward_metrics(run.ledger.summary()) if run.ledger is not None else {}
            perf = {"perf/tokens_per_s": window.rate(), "perf/sim_tokens_per_s": simulated.rate()}
            run.logger.log(run.step, {**step_metrics, **poi_metrics, **rewards, **perf})
            window, simulated = Throughput(), Throughput()
        if run.step % cfg.eval_every == 0 or run.step == cfg.max_steps:
            last_val = validate(run, final=run.step == cfg.max_steps)
            run.logger.log(run.step, last_val)
        if run.step % cfg.ckpt_every == 0 or run.step == cfg.max_steps:
            save_checkpoint(run.run_dir, run.step, checkpoint_state(run), keep=cfg.keep_checkpoints)
    bar.close()
    return finish(run, last_val, time.perf_counter() - started)


class Throughput:
    def __init__(self):
        self.tokens, self.seconds = 0, 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds

    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def train_step(run: Run) -> dict:
    tick = time.perf_counter()
    virtual_start = virtual_clock_s(run.layers)
    batch = run.data.train_batch(run.step)
    inputs, targets = (t.to(run.accelerator.device) for t in (batch.inputs, batch.targets))
    with run.autocast():
        pred, aux_losses = run.model(inputs, step=run.step)
    task_loss = run.model.loss_per_example(pred, targets).mean()
    loss = task_loss + sum(aux_losses.values(), torch.zeros((), device=task_loss.device))
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} at step {run.step}")
    if run.scorer is not None:
        run.scorer.before_backward(run.step, pred)  # taylor's curvature: a backward to the layer outputs
    run.accelerator.backward(loss)
    if run.scorer is not None:
        run.scorer.observe(run.step)  # reads this step's evidence, writes next step's selection bias
    grad_norm = run.accelerator.clip_grad_norm_(run.model.parameters(), run.cfg.trainer.grad_clip)
    for layer in run.layers:
        layer.pool.step(run.step)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    metrics = {
        "train/loss": task_loss.item(),
        "train/grad_norm": float(grad_norm),
        "train/lr": run.scheduler.get_last_lr()[0],
        **{f"train/{name}": value.item() for name, value in aux_losses.items()},
        **routing_metrics(run.layers),
        **simulated_latency(run.layers),
    }
    return {**metrics, "tokens": targets.numel() if run.model.task == "lm" else targets.shape[0],
            "seconds": time.perf_counter() - tick, "virtual_seconds": virtual_clock_s(run.layers) - virtual_start}


def virtual_clock_s(layers: list[MoELayer]) -> float:
    """Virtual seconds the simulated network (local pools) has spent waiting, summed over layers: the
    layers run one after another, so their waits add up. Wall-clock throughput does not see them."""
    return sum(layer.pool.network_clock_s for layer in layers)


def simulated_latency(layers: list[MoELayer]) -> dict[str, float]:
    """The slowest `slow:ms` behaviour among a layer's called experts, in virtual time (local pools)."""
    return {
        f"behaviours/{layer.name}/simulated_latency_ms": layer.pool.simulated_latency_ms
        for layer in layers
        if layer.pool.simulated_latency_ms > 0
    }


def routing_metrics(layers: list[MoELayer]) -> dict[str, float]:
    return {
        f"router/{layer.name}/{name}": float(value)
        for layer in layers
        if layer.last_plan is not None
        for name, value in layer.last_plan.metrics.items()
    }


def validate(run: Run, final: bool = False) -> dict:
    """Validation metrics; the final one also counts domain × expert routing, logs its mutual
    information per layer (`routing/<layer>/domain_mi`, bits) and keeps the tables for reports."""
    results = evaluate(run.model, run.data.val_batches(), run.data.domains, autocast=run.autocast, collect_routing=final, step=run.step)
    tables = {key.removeprefix("routing/"): results.pop(key) for key in list(results) if key.startswith("routing/")}
    if tables:
        results.update(specialisation_metrics(tables))
        write_routing_tables(run.run_dir, tables, run.data.domains)
    return results


def checkpoint_state(run: Run) -> dict:
    return {
        "model": run.accelerator.unwrap_model(run.model).state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "pools": {layer.name: layer.pool.state_dict() for layer in run.layers},
        "poi": run.scorer.state_dict() if run.scorer is not None else None,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "config": OmegaConf.to_container(run.cfg, resolve=True),
    }


def restore(run: Run, state: dict) -> None:
    run.accelerator.unwrap_model(run.model).load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    for layer in run.layers:
        layer.pool.load_state_dict(state["pools"][layer.name])
    if run.scorer is not None and state.get("poi"):
        run.scorer.load_state_dict(state["poi"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(_as_random_state(state["rng"]["python"]))
    run.step = int(state["step"])


def _as_random_state(saved) -> tuple:
    version, internal, gauss = saved
    return version, tuple(internal), gauss


def finish(run: Run, last_val: dict, wall_seconds: float) -> dict:
    events = [e for e in read_metrics(run.run_dir) if "perf/tokens_per_s" in e]
    summary = {
        "step": run.step,
        "run_dir": str(run.run_dir),
        **last_val,
        "perf/tokens_per_s": sum(e["perf/tokens_per_s"] for e in events) / max(len(events), 1),
        "perf/sim_tokens_per_s": sum(e.get("perf/sim_tokens_per_s", 0.0) for e in events) / max(len(events), 1),
        "perf/wall_s": wall_seconds,
        **(run.scorer.summary() if run.scorer is not None else {}),
        **({"rewards": run.ledger.summary()} if run.ledger is not None else {}),
    }
    (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def write_run_info(run: Run) -> None:
    """Resolved config, seed, git commit and machine: what a reader needs to reproduce the run."""
    info = {
        "seed": run.cfg.seed,
        "git_commit": git_commit(),
        "config": resolved(run.cfg),
        "device": str(run.accelerator.device),
        "machine": {"platform": platform.platform(), "cpus": _cpu_count(), "torch": torch.__version__},
    }
    (run.run_dir / "run_info.json").write_text(json.dumps(info, indent=2))


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent.parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
