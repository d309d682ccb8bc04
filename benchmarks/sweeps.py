"""Wall time of one sweep on Hydra's basic launcher (jobs one after another, each trainer on all cores)
and on the parallel launcher (`hydra/launcher=parallel`: joblib, `--jobs` at a time, each trainer on its
share of the cores), then `eval.py compare=` on the parallel sweep's folder, unchanged.

The sweep: `experiment=routing_comparison` cut to `--steps` steps, 2 routers × 2 seeds = 4 jobs, experts
in-process. Both sweeps run in this one invocation, one after the other, so they see the same machine.

    python benchmarks/sweeps.py                       # 4 jobs, 150 steps, 2 at a time
    python benchmarks/sweeps.py --steps 300 --jobs 2 --out /tmp/sweep-bench
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--jobs", type=int, default=2, help="parallel launcher: jobs at a time")
    parser.add_argument("--routers", default="topk,switch")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for the two sweeps (default: a temp dir)"
    )
    return parser.parse_args()


def run_sweep(sweep_dir: Path, args: argparse.Namespace, launcher: list[str]) -> float:
    """Seconds the whole `python train.py -m ...` took, start to exit."""
    command = [
        sys.executable, "train.py", "-m", "experiment=routing_comparison",
        f"trainer.max_steps={args.steps}", f"trainer.eval_every={args.steps}", f"trainer.ckpt_every={args.steps}",
        f"router={args.routers}", f"seed={args.seeds}", f"hydra.sweep.dir={sweep_dir}", *launcher,
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"sweep into {sweep_dir} failed:\n{result.stderr[-3000:]}")
    return seconds


def main() -> None:
    args = parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="poimoe-sweeps-"))
    jobs = len(args.routers.split(",")) * len(args.seeds.split(","))
    print(f"sweep: routing_comparison, {jobs} jobs × {args.steps} steps; sweeps in {out}")
    basic_s = run_sweep(out / "basic", args, [])
    print(f"basic launcher (one job at a time)    {basic_s:7.1f} s")
    parallel_s = run_sweep(
        out / "parallel", args, ["hydra/launcher=parallel", f"hydra.launcher.n_jobs={args.jobs}"]
    )
    print(f"parallel launcher ({args.jobs} jobs at a time)    {parallel_s:7.1f} s")
    print(f"parallel / basic wall time: {parallel_s / basic_s:.2f} (speed-up {basic_s / parallel_s:.2f}×)")

    from moe.experiments.comparison import compare_sweep

    table = compare_sweep(out / "parallel")
    print(f"\n`eval.py compare={out / 'parallel'}` → {table}")
    print("\n".join(line for line in table.read_text().splitlines() if line.startswith("|")))


if __name__ == "__main__":
    main()
