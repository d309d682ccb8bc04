"""Routing cost of every strategy, as a fraction of its MoE layer's forward+backward, measured in one run.

Each strategy runs with its registry defaults (so k is the strategy's own: topk/gshard/bias_balanced 2,
expert_choice c = 2, the rest 1) in training mode, over one LocalPool of FFN experts per expert count.
Router and layer timings are interleaved repeat by repeat, so load from other processes hits both alike;
we report medians after warmup. Target: routing ≤ 10 % of the layer for every strategy except `base`.

    python benchmarks/routers.py                      # 4096 tokens, d=512, d_ff=2048, E = 8 and 64
    python benchmarks/routers.py --experts 8 --repeats 3

Legend: N tokens, D model width, E experts.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import router
from experts.modules import FFN
from experts.pool import LocalPool
from moe.nn.layer import MoELayer

TARGET_FRACTION = 0.10
EXEMPT = {"base"}  # an exact balanced assignment per step: its cost is reported, not held to the target


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--strategies", nargs="+", default=router.names())
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--router-repeats", type=int, default=5, help="router timings per layer repeat")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (the reference) or cuda")
    return parser.parse_args()


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def measure(layer: MoELayer, x_ND: torch.Tensor, ids_N: torch.Tensor, args) -> tuple[float, float, float]:
    """(median routing s, median layer forward+backward s, mean assignments per token)."""

    def route():
        return layer.router(x_ND, ids_N, selection_bias_E=layer.selection_bias_E)

    def forward_backward():
        y_BTD, aux = layer(x_ND[None], ids_N[None])
        (y_BTD.square().mean() + sum(aux.values(), torch.zeros((), device=x_ND.device))).backward()
        for parameter in layer.pool.parameters():
            parameter.grad = None

    for _ in range(args.warmup):
        route()
        forward_backward()
    route_times, layer_times = [], []
    for _ in range(args.repeats):
        route_times += [seconds(route, x_ND.device) for _ in range(args.router_repeats)]
        layer_times.append(seconds(forward_backward, x_ND.device))
    assignments = layer.last_plan.token_idx.numel() / x_ND.shape[0]
    return statistics.median(route_times), statistics.median(layer_times), assignments


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} threads"
    print(
        f"routing vs MoE layer forward+backward: N={args.tokens} d={args.d_model} d_ff={args.d_ff} "
        f"on {where}, torch {torch.__version__}, warmup={args.warmup} repeats={args.repeats}"
    )
    print(f"{'strategy':<14} {'E':>3} {'k':>5} {'route ms':>9} {'layer ms':>9} {'fraction':>9}  target")
    for num_experts in args.experts:
        x_ND = torch.randn(args.tokens, args.d_model, device=device)
        ids_N = torch.randint(0, 256, (args.tokens,), device=device)
        pool = LocalPool([FFN(args.d_model, args.d_ff) for _ in range(num_experts)], device=device)
        for name in args.strategies:
            layer = MoELayer(name, router.build(name, args.d_model, num_experts), pool).to(device).train()
            route_s, layer_s, k = measure(layer, x_ND, ids_N, args)
            fraction = route_s / layer_s
            verdict = "exempt" if name in EXEMPT else ("ok" if fraction <= TARGET_FRACTION else "MISSED")
            print(
                f"{name:<14} {num_experts:>3} {k:>5.2f} {route_s * 1e3:>9.2f} {layer_s * 1e3:>9.1f} "
                f"{fraction:>8.1%}  {verdict}",
                flush=True,
            )


if __name__ == "__main__":
    main()
