"""`train(cfg) -> dict`: data → model → router → pool → (scorer, ledger) → logger, then the loop.

Each step: forward (router → DispatchPlan → pool → combine), loss = task loss + aux losses,
backward, then the trunk optimizer steps the trunk and router while every expert's owner steps
its own experts (`pool.step(step)`), exactly as a remote miner would.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from experts.heap import keep_freed_memory
from moe.engine.build import Run, build_run
from moe.engine.checkpoint import (
    check_complete,
    checkpoint_state,
    load_checkpoint,
    restore,
    run_dir_of,
    save_checkpoint,
)
from moe.engine.cores import trainer_threads
from moe.engine.market import market_step
from moe.engine.market_routing import apply_market_bias
from moe.engine.metrics import MetricsLogger, read_metrics, truncate_after
from moe.engine.run_info import SUMMARY_FILE, resolved, write_run_info
from moe.engine.validation import evaluate, specialisation_metrics, write_routing_tables
from moe.errors import ConfigError
from moe.incentives.rewards import (
    cost_per_bpb,
    ledger_summary,
    open_run_ledger,
    reward_metrics,
    score_view,
    step_failures,
)
from moe.nn.layer import MoELayer

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict:
    """Train from a composed config; returns the final summary (also written to summary.json)."""
    resume_state = None
    if cfg.resume:
        resume_path, resume_state = load_checkpoint(cfg.resume)
        check_complete(resume_path, resume_state, cfg.resume_incomplete)
        log.info("resuming from %s (step %d)", resume_path, resume_state["step"])
    run_dir = run_dir_of(resume_path) if resume_state is not None else resolve_run_dir(cfg)
    seed_everything(cfg.seed)
    threads = trainer_threads(cfg)
    if threads > 0:
        torch.set_num_threads(threads)
    if cfg.trainer.keep_freed_memory and keep_freed_memory():  # per-step buffers: no page faults anew
        log.info("the trainer keeps freed memory for its next steps (trainer.keep_freed_memory=false: off)")
    run = build_run(cfg, run_dir)
    try:
        if resume_state is not None:
            restore(run, resume_state)
            truncate_after(run_dir, run.step)
        run.ledger = (
            open_run_ledger(run, resume_step=run.step, checkpoint_state=resume_state.get("ledger"))
            if resume_state is not None
            else open_run_ledger(run, resume_step=None)
        )
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


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
        after_start = time.perf_counter()
        failed_audits = run.auditor.after_step(run.step) if run.auditor is not None else []
        run.charges = market_step(run) if run.market is not None else []  # charges, then lease moves
        if run.market_routing is not None:  # the next step's routing sees this step's reply times and prices
            prices = run.market.price_E if run.market is not None else None
            apply_market_bias(run.layers, run.market_routing, prices)
        step_metrics["seconds"] += time.perf_counter() - after_start
        tokens, seconds = step_metrics.pop("tokens"), step_metrics.pop("seconds")
        window.add(tokens, seconds)
        step_sim_seconds = seconds + step_metrics.pop("virtual_seconds")
        simulated.add(tokens, step_sim_seconds)
        run.sim_seconds += step_sim_seconds
        if run.ledger is not None:  # before any checkpoint of this step, so resume finds the block
            run.ledger.after_step(
                run.step, score_view(run), step_failures(run), audits=failed_audits, charges=run.charges
            )
        bar.update(1)
        bar.set_postfix(loss=f"{step_metrics['train/loss']:.3f}", tok_s=f"{window.rate():.0f}")
        if run.step % cfg.log_every == 0 or run.step == cfg.max_steps:
            poi_metrics = run.scorer.metrics() if run.scorer is not None else {}
            rewards = reward_metrics(run.ledger.summary()) if run.ledger is not None else {}
            rewards |= run.auditor.metrics() if run.auditor is not None else {}
            rewards |= run.market.metrics() if run.market is not None else {}
            perf = {
                "perf/tokens_per_s": window.rate(),
                "perf/sim_tokens_per_s": simulated.rate(),
                "perf/sim_seconds": run.sim_seconds,
            }
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
        **logged_routing_metrics(run.layers),
        **simulated_latency(run.layers),
    }
    return {
        **metrics,
        "tokens": targets.numel() if run.model.task == "lm" else targets.shape[0],
        "seconds": time.perf_counter() - tick,
        "virtual_seconds": virtual_clock_s(run.layers) - virtual_start,
    }


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


def logged_routing_metrics(layers: list[MoELayer]) -> dict[str, float]:
    return {
        f"router/{layer.name}/{name}": float(value)
        for layer in layers
        if layer.last_plan is not None
        for name, value in layer.last_plan.metrics.items()
    }


def validate(run: Run, final: bool = False) -> dict:
    """Validation metrics; the final one also counts domain × expert routing, logs its mutual
    information per layer (`routing/<layer>/domain_mi`, bits) and keeps the tables for reports."""
    results = evaluate(
        run.model,
        run.data.val_batches(),
        run.data.domains,
        autocast=run.autocast,
        collect_routing=final,
        step=run.step,
    )
    tables = {
        key.removeprefix("routing/"): results.pop(key) for key in list(results) if key.startswith("routing/")
    }
    if tables:
        results.update(specialisation_metrics(tables))
        write_routing_tables(run.run_dir, tables, run.data.domains)
    return results


def finish(run: Run, last_val: dict, wall_seconds: float) -> dict:
    logged = read_metrics(run.run_dir)
    events = [e for e in logged if "perf/tokens_per_s" in e]
    summary = {
        "step": run.step,
        "run_dir": str(run.run_dir),
        **last_val,
        "perf/tokens_per_s": sum(e["perf/tokens_per_s"] for e in events) / max(len(events), 1),
        "perf/sim_tokens_per_s": sum(e.get("perf/sim_tokens_per_s", 0.0) for e in events)
        / max(len(events), 1),
        "perf/wall_s": wall_seconds,
        "perf/sim_seconds": run.sim_seconds,
        **(run.scorer.summary() if run.scorer is not None else {}),
        **(ledger_summary(run.ledger) if run.ledger is not None else {}),
        **(run.auditor.metrics() if run.auditor is not None else {}),
        **(run.market.metrics() if run.market is not None else {}),
    }
    if "market/compute_cost" in summary:  # compute tokens per bit/byte of val improvement since step 0
        start_bpb = next((e["val/bpb"] for e in logged if e.get("step") == 0 and "val/bpb" in e), None)
        summary["market/cost_per_bpb"] = cost_per_bpb(
            summary["market/compute_cost"], start_bpb, last_val.get("val/bpb")
        )
    (run.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary
