"""Eval-mode load balance of the balancing routers after training on `experiment=routing_comparison`'s config.

Trains each router in-process (the same data, model, schedule and loop as `python train.py`) for
`--steps` steps, then runs the model in evaluation mode over the whole validation set and pools each
layer's per-expert counts: load CV (std/mean) and MaxVio (max/mean − 1) per layer, as evaluation
routes, not a single training batch. Target (issue 12): load CV ≤ 0.2 at 600 steps for
`bias_balanced` and `sinkhorn` with their defaults; `topk` (no balancing) is the reference.

    python benchmarks/balance.py                                  # 600 steps, seed 0: bias_balanced sinkhorn topk
    python benchmarks/balance.py --routers bias_balanced --steps 300 --seeds 0 1 2
    python benchmarks/balance.py --routers bias_balanced --set router.bias_update_rate=0.01

Legend: E experts.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import moe.engine.config  # noqa: F401  (registers the config schemas)
from moe.engine.build import Run, build_run
from moe.engine.loop import loop, seed_everything
from moe.engine.metrics import MetricsLogger, read_metrics
from moe.engine.run_info import resolved

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAIN_CV_LOGS = (
    10  # train_cv: the mean training-batch load CV over this many last logs (training-mode routing)
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routers", nargs="+", default=["bias_balanced", "sinkhorn", "topk"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    return parser.parse_args()


def composed(router_name: str, seed: int, steps: int, extra: list[str], run_dir: Path):
    overrides = [
        "experiment=routing_comparison",
        f"router={router_name}",
        f"seed={seed}",
        f"trainer.max_steps={steps}",
        f"trainer.eval_every={steps}",
        f"trainer.ckpt_every={steps}",
        f"run_dir={run_dir}",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name="train", overrides=overrides)


def trained(cfg) -> Run:
    """A run trained exactly as `train.py` trains it (no resume), left open for evaluation."""
    seed_everything(cfg.seed)
    run = build_run(cfg, Path(cfg.run_dir))
    run.logger = MetricsLogger(run.run_dir, cfg.logger, run_name=cfg.name, config=resolved(cfg), resume=False)
    try:
        loop(run)
    finally:
        run.logger.close()
    return run


@torch.no_grad()
def eval_counts(run: Run) -> dict[str, torch.Tensor]:
    """Per layer, the per-expert assignment counts [E] pooled over the validation set in evaluation mode."""
    model = run.model
    model.eval()
    counts: dict[str, torch.Tensor] = {}
    for batch in run.data.val_batches():
        with run.autocast():
            model(batch.inputs.to(run.accelerator.device), step=run.step)
        for layer in model.moe_layers():
            counts_E = layer.last_plan.counts.cpu()
            counts[layer.name] = counts.get(layer.name, torch.zeros_like(counts_E)) + counts_E
    return counts


def balance(counts_E: torch.Tensor) -> tuple[float, float]:
    """(load CV, MaxVio) of per-expert counts."""
    load_E = counts_E.double()
    mean = load_E.mean().clamp_min(1e-9)
    return float(load_E.std(unbiased=False) / mean), float(load_E.max() / mean - 1)


def main() -> None:
    args = parse_args()
    print(
        f"{'router':<15}{'seed':>5}{'layer':>8}{'load_cv':>9}{'max_vio':>9}{'train_cv':>9}{'val_loss':>10}{'wall_s':>8}"
    )
    for router_name in args.routers:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as run_dir:
                cfg = composed(router_name, seed, args.steps, args.set, Path(run_dir))
                started = time.perf_counter()
                run = trained(cfg)
                try:
                    counts = eval_counts(run)
                finally:
                    run.transport.close()
                wall_s = time.perf_counter() - started
                events = read_metrics(Path(run_dir))
            val_loss = last_logged(events, "val/loss", count=1)
            for layer_name, counts_E in counts.items():
                load_cv, max_vio = balance(counts_E)
                train_cv = last_logged(events, f"router/{layer_name}/load_cv", count=TRAIN_CV_LOGS)
                print(
                    f"{router_name:<15}{seed:>5}{layer_name:>8}{load_cv:>9.3f}{max_vio:>9.3f}"
                    f"{train_cv:>9.3f}{val_loss:>10.4f}{wall_s:>8.0f}"
                )


def last_logged(events: list[dict], key: str, count: int) -> float:
    """The mean of the last `count` logged values of `key` (nan if never logged)."""
    values = [event[key] for event in events if key in event][-count:]
    return sum(values) / len(values) if values else float("nan")


if __name__ == "__main__":
    main()
