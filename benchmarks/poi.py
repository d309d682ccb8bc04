"""PoI cost, measured in one run: taylor's step-time overhead, one loo and one shapley evaluation, and
token_shapley's (the default) cost per step at its cadence.

For each scenario (the default `python train.py` byte LM, and `data=clusters`; both with experts in
process, `transport=local`, and no ledger, `~ledger`, so that the numbers are PoI's own and not the
workers' or the other validators' fresh views at each epoch) it builds the same run
three times: without PoI (`~poi`), with poi=taylor (first order + curvature, the default), and with
poi=taylor `curvature=false`. Blocks of 10 training steps (one curvature step each) of the three are
interleaved, so load from other processes hits all alike; medians over blocks after a warm-up block. Target: taylor ≤ 5 % of a training step. Then
it times one loo view and one shapley view (`--samples` permutations) on a validation batch of the
trained model, also as a multiple of one evaluation forward timed just before (robust to load).

    python benchmarks/poi.py                       # both scenarios, 8 blocks of 10 steps each
    python benchmarks/poi.py --scenarios clusters --blocks 20

Legend: E experts, L MoE layers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchtools import build_training_run, interleaved_step_times, run_scenarios  # noqa: E402  (sibling module)

TARGET_OVERHEAD = 0.05
SCENARIOS = {
    "lm": ["transport=local", "~ledger"],  # the default run's byte LM on the mixture corpus
    "clusters": ["data=clusters", "transport=local", "~ledger"],
}
VARIANTS = {"none": ["~poi"], "taylor": ["poi=taylor"], "taylor-1st": ["poi=taylor", "poi.curvature=false"]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--blocks", type=int, default=8, help="timed blocks of steps per variant")
    parser.add_argument("--block", type=int, default=10, help="steps per block (taylor's curvature_every)")
    parser.add_argument("--samples", type=int, default=16, help="shapley permutations")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    return parser.parse_args()


def view_seconds(run, scorer: str, samples: int) -> tuple[float, float]:
    """(seconds of one view, seconds of one plain evaluation forward on the same batch just before it):
    the ratio stays meaningful when other processes load the machine."""
    from moe.incentives.poi import LooConfig, ShapleyConfig, TokenShapleyConfig, views_on_batch
    from moe.incentives.poi.views import batch_loss, evaluation_mode
    from router.seeds import torch_generator

    cfg = {
        "loo": LooConfig(),
        "shapley": ShapleyConfig(samples=samples),
        "token_shapley": TokenShapleyConfig(),
    }[scorer]
    batch = run.data.val_batches()[0]
    model = run.accelerator.unwrap_model(run.model)
    with evaluation_mode(model):
        forward = statistics.median(timed(lambda: batch_loss(model, batch)) for _ in range(5))
    return timed(lambda: views_on_batch(cfg, model, batch, torch_generator(0, "poi", 0))), forward


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def report(name: str, scenario: list[str], args: argparse.Namespace, root: Path) -> None:
    runs = {
        variant: build_training_run([*scenario, *overrides], root / f"{name}-{variant}", args.threads)
        for variant, overrides in VARIANTS.items()
    }
    try:
        layers = runs["none"].layers
        experts = layers[0].pool.num_experts
        medians = interleaved_step_times(runs, args.blocks, args.block)
        base = medians["none"]
        print(
            f"[{name}] L={len(layers)} E={experts}, {args.blocks} interleaved blocks of {args.block} steps, "
            f"threads={torch.get_num_threads()}"
        )
        print(f"  training step, no PoI (~poi)  {base * 1e3:8.2f} ms")
        for variant in ("taylor", "taylor-1st"):
            overhead = medians[variant] / base - 1
            verdict = "ok" if overhead <= TARGET_OVERHEAD else "ABOVE TARGET"
            label = "taylor (1st + curvature)" if variant == "taylor" else "taylor (first order only)"
            print(
                f"  {label:28s}  {medians[variant] * 1e3:8.2f} ms   overhead {overhead:+7.1%}   "
                f"(target <= {TARGET_OVERHEAD:.0%}: {verdict})"
            )
        trained = runs["taylor"]
        for scorer, forwards in (
            ("loo", f"1 + L·E = {1 + len(layers) * experts}"),
            ("shapley", f"{args.samples} permutations: at most 1 + L·(1 + {args.samples}·(E-1)), memoised"),
        ):
            seconds, forward = view_seconds(trained, scorer, args.samples)
            print(
                f"  one {scorer:7s} view  {seconds * 1e3:9.1f} ms = {seconds / base:6.1f} training steps "
                f"= {seconds / forward:6.1f} eval forwards ({forwards} forwards)"
            )
        token_shapley_cost(trained, base, len(layers))
    finally:
        for run in runs.values():
            run.transport.close()


def token_shapley_cost(run, step_seconds: float, num_layers: int) -> None:
    """token_shapley (the default PoI) views once every `every` steps: its cost per training step is one
    view's time over `every` steps (the median of 5 views, each against the step time measured above)."""
    from moe.incentives.poi import TokenShapleyConfig

    every = TokenShapleyConfig().every
    seconds = statistics.median(view_seconds(run, "token_shapley", 0)[0] for _ in range(5))
    overhead = seconds / every / step_seconds
    verdict = "ok" if overhead <= TARGET_OVERHEAD else "ABOVE TARGET"
    print(
        f"  one token_shapley view {seconds * 1e3:7.1f} ms ({1 + 3 * num_layers} forwards for top-2) "
        f"every {every} steps: overhead {overhead:+7.1%} of a step   (target <= {TARGET_OVERHEAD:.0%}: {verdict})"
    )


def main() -> None:
    args = parse_args()
    run_scenarios(report, SCENARIOS, args.scenarios, args, "poi-bench-")


if __name__ == "__main__":
    main()
