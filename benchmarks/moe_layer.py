"""MoE layer forward+backward against a dense FFN with the same activated FLOPs and a naive loop; training
steps in bf16 against fp32; attention's kernels under bf16 autocast by sequence length and head size.

    python benchmarks/moe_layer.py [--tokens 4096 --d-model 512 --d-ff 2048 --experts 8 --top-k 2]
    python benchmarks/moe_layer.py --sections bf16 --blocks 6 --block 5     # the bf16 rows only
    python benchmarks/moe_layer.py --sections bf16 --attention fused_fp32   # bf16 runs with that attention
    python benchmarks/moe_layer.py --sections attention --threads 1 --clock cpu

Sections (all by default):
- layer: each time and the ratio dense / MoE (target ≥ 0.85), fp32.
- bf16: tokens/s of `train.py`'s training step (transport=local, no PoI, no ledger) in fp32 and under
  `trainer.precision=bf16`, blocks of steps of the two runs alternating, at the default size and at
  d_model 512, d_ff 2048 ("d512"), with bf16's speed-up: the median, over rounds, of the ratio of the two
  runs' blocks timed in the same round, with its quartiles (targets where the CPU has bf16 units: ≥ 1.2 and
  ≥ 2); then the bf16 run without row buckets (`experts.row_buckets=off`, timed alone), and how many
  distinct expert row counts each bf16 run's expert calls saw (experts/rows.py). It first says whether
  the CPU has bf16 units.
- attention: causal attention forward+backward under CPU bf16 autocast, by sequence length and head size,
  each of moe/nn/model.py's ways (`ATTENTION_WAYS`: explicit bf16 scores, torch's fused kernel in bf16,
  the fused kernel in fp32), beside the way its rule (`attention_way`) picks.

`--clock cpu` times with this process's CPU seconds instead of wall time: on a loaded machine, with
`--threads 1`, the time a quiet one would take. Legend: N tokens, D width, E experts, B batch, H heads,
T time, k head width.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchtools import (  # noqa: E402  (sibling module: scripts run as python benchmarks/<name>.py)
    CLOCKS,
    build_training_run,
    interleaved_block_times,
    interleaved_medians,
    interleaved_step_times,
    paired_ratios,
)

import router  # noqa: E402
from experts.modules import FFN  # noqa: E402
from experts.pool import LocalPool  # noqa: E402
from experts.rows import RowBuckets  # noqa: E402
from moe.nn.layer import MoELayer  # noqa: E402
from moe.nn.model import ATTENTION_WAYS, attention_way  # noqa: E402

TRAIN_RUN = ["transport=local", "~poi", "~ledger"]  # issue 15's `transport=local ~poi ledger.enabled=false`
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
SIZES = {"default": [], "d512": ["model.d_model=512", "experts.d_ff=2048"]}  # d512: d_model 512, d_ff 2048
TARGETS = {"default": 1.2, "d512": 2.0}  # bf16 / fp32 tokens/s where the CPU has bf16 units (issue 15)
HEAD_SIZES = ((64, 4), (128, 4), (128, 2), (512, 4), (512, 2))  # (D, H): heads of 16, 32, 64, 128, 256
ATTENTION_SEQ_LENS = (32, 128, 512, 1024)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["layer", "bf16", "attention"],
                        choices=["layer", "bf16", "attention"])  # fmt: skip
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--blocks", type=int, default=6, help="bf16: timed blocks of steps per run")
    parser.add_argument("--block", type=int, default=5, help="bf16: training steps per block")
    parser.add_argument(
        "--sizes", nargs="+", default=list(SIZES), choices=list(SIZES), help="bf16: model sizes"
    )
    parser.add_argument("--row-buckets", default="auto", help="bf16: experts.row_buckets of the bf16 run")
    parser.add_argument("--attention", default="auto", help="bf16: model.attention of the bf16 runs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


# --- layer -----------------------------------------------------------------------------------------


def naive_loop(layer: MoELayer, x_ND: torch.Tensor) -> torch.Tensor:
    """The obvious implementation: a boolean mask per expert, a gather and a scatter per expert."""
    plan = layer.router(x_ND)
    out_ND = torch.zeros_like(x_ND)
    for e, expert in enumerate(layer.pool.experts):
        mine_A = plan.expert_idx == e
        tokens_A = plan.token_idx[mine_A]
        out_ND = out_ND.index_add(0, tokens_A, plan.gate[mine_A, None] * expert(x_ND[tokens_A]))
    return out_ND


def layer_section(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    device = torch.device(args.device)
    d, f = args.d_model, args.d_ff
    experts = [FFN(d, f) for _ in range(args.experts)]
    gate = router.build("topk", d, args.experts, top_k=args.top_k).to(device)
    layer = MoELayer("bench", gate, LocalPool(experts, device=device)).to(device)
    dense = FFN(d, args.top_k * f).to(device)  # same activated FLOPs per token as k experts of width f
    x_ND = torch.randn(args.tokens, d, device=device, requires_grad=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def moe_step():
        y_BTD, _ = layer(x_ND[None])
        y_BTD.sum().backward()
        sync()

    def dense_step():
        dense(x_ND).sum().backward()
        sync()

    def naive_step():
        naive_loop(layer, x_ND).sum().backward()
        sync()

    print(
        f"T={args.tokens} d={d} f={f} E={args.experts} k={args.top_k} fp32 on {device}, threads={torch.get_num_threads()}"
    )
    steps = {"dense": dense_step, "moe": moe_step, "naive": naive_step}
    times = interleaved_medians(steps, repeats=args.repeats, clock=args.clock)
    for name, seconds in times.items():
        print(f"  {name:6s} forward+backward {seconds * 1e3:8.2f} ms")
    print(f"dense / MoE = {times['dense'] / times['moe']:.3f}   (target >= 0.85)")
    print(f"naive / MoE = {times['naive'] / times['moe']:.3f}")


# --- bf16 training steps ----------------------------------------------------------------------------


def cpu_bf16_units() -> list[str] | None:
    """The CPU's bf16 matrix/vector units named in /proc/cpuinfo's flags; None where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return [flag for flag in BF16_FLAGS if flag in flags]


def bf16_units_note() -> str:
    units = cpu_bf16_units()
    if units is None:
        return "CPU bf16 units: unknown (no /proc/cpuinfo); the speed targets may not apply"
    if units:
        return f"CPU bf16 units: {' '.join(units)}: the bf16 speed targets apply"
    return (
        f"CPU bf16 units: none ({' or '.join(BF16_FLAGS)} missing): bf16 is emulated on this CPU, the "
        "speed targets (>= 1.2x, >= 2x) do not apply; the row-count counts below still do"
    )


def open_run(size: list[str], precision: str, row_buckets: str, run_dir: Path, args: argparse.Namespace):
    """A training run as `train.py` builds it (seed 0), and the set its expert calls' row counts go to; bf16
    runs attend as `args.attention` says."""
    torch.manual_seed(0)
    overrides = [*TRAIN_RUN, *size, f"trainer.precision={precision}", f"experts.row_buckets={row_buckets}"]
    if precision == "bf16":
        overrides.append(f"model.attention={args.attention}")
    run = build_training_run(overrides, run_dir, args.threads)
    rows: set[int] = set()
    for layer in run.layers:
        for expert in layer.pool.experts:
            expert.register_forward_pre_hook(lambda module, inputs: rows.add(inputs[0].shape[0]))
    return run, rows


def bf16_section(args: argparse.Namespace) -> None:
    print(bf16_units_note())
    print(f"training steps ({' '.join(TRAIN_RUN)}), median of {args.blocks} blocks of {args.block} after a "
          f"warm-up block, {args.clock} clock, threads={torch.get_num_threads()}, bf16 runs with "
          f"model.attention={args.attention}")  # fmt: skip
    print(f"{'size':<10}{'fp32 tok/s':>12}{'bf16 tok/s':>12}{'bf16/fp32':>11}{'quartiles':>13}{'target':>8}"
          f"{'bf16 no-buckets tok/s':>23}{'rows seen: buckets':>20}{'no buckets':>12}")  # fmt: skip
    for name in args.sizes:
        rate, speedup, rows_seen, tokens = bf16_row(SIZES[name], args)
        ratio, low, high = speedup
        print(f"{name:<10}{rate['fp32']:>12.0f}{rate['bf16']:>12.0f}{ratio:>11.2f}{f'{low:.2f}-{high:.2f}':>13}"
              f"{TARGETS[name]:>8.1f}{rate['plain']:>23.0f}{rows_seen['bf16']:>20}{rows_seen['plain']:>12}")  # fmt: skip
    print(
        "bf16/fp32: the median over rounds of fp32's time / bf16's time in blocks timed in the same round,"
        " with its quartiles"
    )
    steps = (args.blocks + 1) * args.block
    print(
        f"rows seen: distinct row counts of the expert calls (forward, every expert) in {steps} steps", end=""
    )
    buckets = RowBuckets.parse(args.row_buckets)
    if buckets.growth is not None:  # an expert gets each token at most once: at most `tokens` rows a call
        bound = len({0} | {buckets.rows(count) for count in range(1, tokens + 1)})  # 0: a call with no rows
        print(
            f"; row_buckets={args.row_buckets} allows at most {bound} for calls of 0 to {tokens} rows", end=""
        )
    print()


def bf16_row(size: list[str], args: argparse.Namespace) -> tuple[dict, tuple, dict, int]:
    """Tokens/s of fp32, bf16 and bf16 without row buckets ("plain"); bf16's speed-up over fp32 in paired
    blocks (median, quartiles); distinct expert row counts of both bf16 runs; the tokens of a step."""
    timing = (args.blocks, args.block, args.clock)
    with tempfile.TemporaryDirectory() as folder:
        # fp32 first: each build resets accelerate's shared state to its own precision, and only the bf16
        # runs read it (their autocast)
        fp32, _ = open_run(size, "fp32", "auto", Path(folder, "fp32"), args)
        tokens = fp32.data.train_batch(1).targets.numel()
        bf16, bucketed = open_run(size, "bf16", args.row_buckets, Path(folder, "bf16"), args)
        blocks = interleaved_block_times({"fp32": fp32, "bf16": bf16}, *timing)
        close(fp32, bf16)
        seconds = {name: statistics.median(times) for name, times in blocks.items()}
        speedup = paired_ratios(blocks["fp32"], blocks["bf16"])
        # alone: its per-shape kernels would crowd the bucketed run's out of oneDNN's cache
        plain, unbucketed = open_run(size, "bf16", "off", Path(folder, "plain"), args)
        seconds |= interleaved_step_times({"plain": plain}, *timing)
        close(plain)
    rate = {key: tokens / value for key, value in seconds.items()}
    return rate, speedup, {"bf16": len(bucketed), "plain": len(unbucketed)}, tokens


def close(*runs) -> None:
    for run in runs:
        run.transport.close()


# --- attention -------------------------------------------------------------------------------------


def attention_section(args: argparse.Namespace, tokens: int = 2048) -> None:
    print(f"causal attention forward+backward under CPU bf16 autocast, B·T={tokens}, {args.clock} clock, "
          f"threads={torch.get_num_threads()}; rule: what moe/nn/model.py's attention_way picks")  # fmt: skip
    ways_ms = "".join(f"{way + ' ms':>14}" for way in ATTENTION_WAYS)
    print(f"{'T':>5}{'D':>6}{'H':>4}{'k':>6}{ways_ms}{'fastest':>12}{'rule':>12}")
    for seq_len in ATTENTION_SEQ_LENS:
        for d_model, heads in HEAD_SIZES:
            shape = (tokens // seq_len, heads, seq_len, d_model // heads)
            qkv = [torch.randn(shape, requires_grad=True) for _ in range(3)]
            steps = {way: partial(attention_step, attend, qkv) for way, attend in ATTENTION_WAYS.items()}
            times = interleaved_medians(steps, repeats=args.repeats * 2, warmup=3, clock=args.clock)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                rule = attention_way(qkv[0])
            print(f"{seq_len:>5}{d_model:>6}{heads:>4}{d_model // heads:>6}"
                  + "".join(f"{times[way] * 1e3:>14.2f}" for way in ATTENTION_WAYS)
                  + f"{min(times, key=times.get):>12}{rule:>12}")  # fmt: skip


def attention_step(attend, qkv: list[torch.Tensor]) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):  # q, k, v come out of a bf16 projection
        q_BHTk, k_BHTk, v_BHTk = (t.bfloat16() for t in qkv)
        attend(q_BHTk, k_BHTk, v_BHTk).float().sum().backward()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    sections = {"layer": layer_section, "bf16": bf16_section, "attention": attention_section}
    for name in args.sections:
        sections[name](args)


if __name__ == "__main__":
    main()
