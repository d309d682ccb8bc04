"""Audit overhead, measured in one run: the step time with audits at `audit.rate` vs without.

For each scenario (the default `python train.py` byte LM, and `data=clusters`; both with experts in
process, `transport=local`, and no ledger, `~ledger`, so the numbers are the audits' own) it builds the
same run three times: audits off (`audit.rate=0`), commitments only (audits enabled at a rate so low
that none is drawn: what every step pays for output sketches and the owners' trails), and audits at
`--rate` (default 0.05, the issue's target: overhead ≤ 7 % of a training step). A step is the
training step plus the auditor's end-of-step work (sampling, re-running, replaying). Blocks of steps
of the three are interleaved, so load from other processes hits all alike; medians over blocks after
a warm-up block. The overhead is the median over blocks of the ratio of a block to the audits-off
block timed in the same round, printed with its quartiles.

    python benchmarks/audits.py                          # both scenarios
    python benchmarks/audits.py --scenarios clusters --blocks 20
    python benchmarks/audits.py --threads 1 --clock cpu  # on a loaded machine: this process's CPU time
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchtools import (  # noqa: E402  (sibling module)
    CLOCKS,
    build_training_run,
    interleaved_block_times,
    paired_ratios,
    run_scenarios,
    timed_train_step,
)

TARGET_OVERHEAD = 0.07
SCENARIOS = {
    "lm": ["transport=local", "~ledger"],  # the default run's byte LM on the mixture corpus
    "clusters": ["data=clusters", "transport=local", "~ledger"],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--rate", type=float, default=0.05, help="audit.rate of the audited run")
    parser.add_argument("--blocks", type=int, default=8, help="timed blocks of steps per variant")
    parser.add_argument("--block", type=int, default=10, help="steps per block")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="cpu: this process's CPU seconds"
    )
    return parser.parse_args()


def variants(rate: float) -> dict[str, list[str]]:
    return {"off": ["audit.rate=0"], "commitments": ["audit.rate=1e-12"], "audits": [f"audit.rate={rate}"]}


def report(name: str, scenario: list[str], args: argparse.Namespace, root: Path) -> None:
    runs = {variant: build_training_run([*scenario, *overrides], root / f"{name}-{variant}", args.threads)
            for variant, overrides in variants(args.rate).items()}  # fmt: skip
    try:
        layers = runs["off"].layers
        times = interleaved_block_times(runs, args.blocks, args.block, args.clock)
        base = statistics.median(times["off"])
        audited = runs["audits"].auditor
        calls = sum(n for (_, _, what), n in audited.tally.items() if what == "run")
        print(f"[{name}] L={len(layers)} E={layers[0].pool.num_experts}, {args.blocks} interleaved blocks of "
              f"{args.block} steps, {args.clock} clock, threads={torch.get_num_threads()}, {calls} calls audited")  # fmt: skip
        print(f"  training step, audits off           {base * 1e3:8.2f} ms")
        for variant, label in (
            ("commitments", "commitments only (rate ~0)"),
            ("audits", f"audit.rate={args.rate}"),
        ):
            ratio, low, high = paired_ratios(times[variant], times["off"])
            verdict = "ok" if ratio - 1 <= TARGET_OVERHEAD else "ABOVE TARGET"
            print(f"  {label:34s}  {statistics.median(times[variant]) * 1e3:8.2f} ms   overhead {ratio - 1:+7.1%}"
                  f" (blocks' quartiles {low - 1:+.1%}..{high - 1:+.1%}; target <= {TARGET_OVERHEAD:.0%}: {verdict})")  # fmt: skip
        print_breakdown(runs["audits"], base, args)
    finally:
        for run in runs.values():
            run.transport.close()


def print_breakdown(run, base_s: float, args: argparse.Namespace) -> None:
    """Where the audited run's extra time goes, from `args.blocks` more blocks of it alone, on the run's
    clock: the owners' commitments (sketches, snapshots, the trail's bookkeeping) and the auditor's
    end-of-step work; the
    rest of the overhead is what keeping gradients for replays costs the backward and the owners'
    steps (each step's gradients are fresh memory, not the previous step's freed buffers)."""
    import experts.owner

    clock, spent = CLOCKS[args.clock], {"commitments": 0.0, "audits": 0.0}

    def timed(name: str, fn):
        def run_timed(*args):
            start = clock()
            result = fn(*args)
            spent[name] += clock() - start
            return result

        return run_timed

    commit_owners, after_step = experts.owner.commit_owners, run.auditor.after_step
    experts.owner.commit_owners = timed("commitments", commit_owners)
    run.auditor.after_step = timed("audits", after_step)
    try:
        steps = args.blocks * args.block
        total = sum(timed_train_step(run, args.clock) for _ in range(steps))
    finally:
        experts.owner.commit_owners = commit_owners
        del run.auditor.after_step  # the class's method again
    commits, audits = spent["commitments"] / steps, spent["audits"] / steps
    print(f"  of the audited step's {total / steps * 1e3:.2f} ms: commitments {commits * 1e3:.2f} ms"
          f" ({commits / base_s:.1%} of a step), audits {audits * 1e3:.2f} ms ({audits / base_s:.1%})")  # fmt: skip


def main() -> None:
    args = parse_args()
    run_scenarios(report, SCENARIOS, args.scenarios, args, "audit-bench-")


if __name__ == "__main__":
    main()
