"""MoE layer forward+backward against a dense FFN with the same activated FLOPs and a naive loop.

    python benchmarks/moe_layer.py [--tokens 4096 --d-model 512 --d-ff 2048 --experts 8 --top-k 2]

Prints each time and the ratio dense / MoE (target ≥ 0.85). Legend: N tokens, D width, E experts.
"""

from __future__ import annotations

import argparse

import torch
from benchtools import interleaved_medians  # sibling module: scripts run as python benchmarks/<name>.py

import router
from experts.modules import FFN
from experts.pool import LocalPool
from moe.nn.layer import MoELayer


def naive_loop(layer: MoELayer, x_ND: torch.Tensor) -> torch.Tensor:
    """The obvious implementation: a boolean mask per expert, a gather and a scatter per expert."""
    plan = layer.router(x_ND)
    out_ND = torch.zeros_like(x_ND)
    for e, expert in enumerate(layer.pool.experts):
        mine_A = plan.expert_idx == e
        tokens_A = plan.token_idx[mine_A]
        out_ND = out_ND.index_add(0, tokens_A, plan.gate[mine_A, None] * expert(x_ND[tokens_A]))
    return out_ND


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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

    print(f"T={args.tokens} d={d} f={f} E={args.experts} k={args.top_k} fp32 on {device}, threads={torch.get_num_threads()}")
    times = interleaved_medians({"dense": dense_step, "moe": moe_step, "naive": naive_step}, repeats=args.repeats)
    for name, seconds in times.items():
        print(f"  {name:6s} forward+backward {seconds * 1e3:8.2f} ms")
    print(f"dense / MoE = {times['dense'] / times['moe']:.3f}   (target >= 0.85)")
    print(f"naive / MoE = {times['naive'] / times['moe']:.3f}")


if __name__ == "__main__":
    main()
