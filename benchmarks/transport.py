"""How much the process transport costs: wire round trips, and one MoE layer step remote vs in-process.

    python benchmarks/transport.py [--workers 2] [--threads 1] [--repeats 5] [--tokens 4096]

Prints, from one run on one machine:
1. round-trip latency and bandwidth per message (ECHO to a worker and back: framing, checksums,
   ZeroMQ) at 16 KB, 1 MB and 16 MB, next to the cost of framing alone;
2. one MoE layer training step (router → pool → combine → backward → owner steps) at T=4096,
   d=512, f=2048, E=4, k=2, in-process with `workers × threads` torch threads vs in `workers`
   worker processes of `threads` threads each (compute thread counts matched; the trainer beside them
   on the cores they leave, as `python train.py` runs it), with the overhead ratio, and (on the CPU) the
   CPU each step costs both setups with the ratio those costs allow at best on this machine's cores,
   and the trainer's timeline of a process step: its serial phases (before the first request; from the
   last forward reply to the first gradient sent), which no worker overlaps, and the ratio they and the
   slowest worker's CPU allow (benchmarks/step_cost.py);
   then the cost of CURVE: the same step over tcp without and with CURVE (encryption and key
   authentication, `transport.auth`), steps alternating between the two, each as process / local;
3. the same layer against hivemind's RemoteMixtureOfExperts (hidden 512, batch 128, 4 experts,
   k=2, forward+backward, samples/s) when hivemind is importable (`pip install .[compare]`),
   otherwise why it was skipped; next to both, the compute floor: a worker's share of the expert
   arithmetic alone, the rate no transport can beat on this machine. poimoe and the floor are timed
   in turns, and the CPU each step costs the trainer and each worker is printed beside the floor's,
   with the fraction of the floor those costs allow at best on this machine's cores, and again with
   the trainer's serial phases: on a shared machine wall times swing with the load, CPU times far
   less.

Steps timed in turns share whatever load the machine has, but a setup of more processes (the trainer
and its workers) gets more of a loaded machine's CPU than one process does, so on a busy machine
process/local and the fraction of the floor come out better than on a quiet one.

Legend: B batch, T tokens per sequence, D model width.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# sibling module: scripts run as python benchmarks/<name>.py
from benchtools import interleaved_medians, median_seconds
from step_cost import CpuMeter, StepTimeline, print_cpu_bound, print_layer_cpu

import router
from experts.heap import keep_freed_memory
from experts.modules import FFN, ExpertsConfig
from experts.owner import ExpertOwner, OptimizerSettings
from experts.pool import LocalPool
from experts.remote import ProcessTransport, ProcessTransportConfig
from experts.remote.wire import Kind, Message, decode, encode
from moe.nn.layer import MoELayer

MESSAGE_SIZES = {"16 KB": 16 * 2**10, "1 MB": 2**20, "16 MB": 16 * 2**20}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--repeats", type=int, default=5, help="timed layer steps (after one warm-up)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda: the local pool's and every worker's device"
    )
    parser.add_argument("--hivemind-only", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


# --- 1. round trips ----------------------------------------------------------------------------------


def echo_once(transport: ProcessTransport, payload: torch.Tensor, workers: tuple[str, ...] = ("w0",)) -> None:
    """`payload` to each of `workers` and back."""
    coordinator = transport.coordinator
    requests = {}
    for worker in workers:
        key = (next(coordinator.request_ids), 0, 0)
        requests[key] = (worker, Message(Kind.ECHO, key[0], tensors=[payload]))
    for reply in coordinator.request(requests, Kind.ECHOED, timeout=30).values():
        if isinstance(reply, str) or reply.tensors[0].numel() != payload.numel():
            raise RuntimeError(f"echo failed: {reply}")


def settled(transport: ProcessTransport) -> None:
    """Wait until every worker has done what it was sent (its owner steps, which it acks
    asynchronously): a worker answers messages in order, so its echo comes back after them. It adds
    one small round trip (section 1's 16 KB row, at most) to each remote step: a bias against it."""
    echo_once(transport, torch.zeros(1), tuple(sorted(transport.coordinator.registered_names())))


def bench_round_trips(transport: ProcessTransport) -> None:
    print("\n1. round trip per message (trainer → worker → trainer; framing + checksums + ZeroMQ)")
    print(f"   {'size':>6}  {'median RTT':>11}  {'per direction':>13}  {'framing only':>12}")
    for label, size in MESSAGE_SIZES.items():
        payload = torch.randn(size // 4)
        repeats = 200 if size < 2**20 else 50 if size < 2**24 else 10
        rtt = median_seconds(lambda p=payload: echo_once(transport, p), repeats=repeats, warmup=3)
        framing = median_seconds(
            lambda p=payload: decode(encode(Message(Kind.ECHO, tensors=[p]))), repeats=repeats
        )
        bandwidth = size / (rtt / 2) / 1e9
        print(f"   {label:>6}  {rtt * 1e6:>9.0f}µs  {bandwidth:>9.2f} GB/s  {framing * 1e6:>10.0f}µs")


# --- 2. one MoE layer step ---------------------------------------------------------------------------


def make_layer(args, pool) -> MoELayer:
    torch.manual_seed(1)
    layer_router = router.build("topk", args.d_model, args.experts, top_k=args.top_k)
    return MoELayer("bench", layer_router, pool)


def layer_step(layer: MoELayer, x_BTD: torch.Tensor) -> None:
    out_BTD, _ = layer(x_BTD)
    out_BTD.square().mean().backward()
    layer.pool.step(0)
    layer.router.zero_grad(set_to_none=True)


def bench_layer(args, transport: ProcessTransport) -> float:
    compute_threads = args.workers * args.threads
    print(
        f"\n2. MoE layer step, T={args.tokens} d={args.d_model} f={args.d_ff} E={args.experts} k={args.top_k}"
        f" (forward + backward + owner steps; median of {args.repeats}, local and process in turns)"
    )
    torch.manual_seed(0)
    experts = [FFN(args.d_model, args.d_ff) for _ in range(args.experts)]
    experts_cfg = ExpertsConfig(num=args.experts, d_ff=args.d_ff)
    x_BTD = torch.randn(1, args.tokens, args.d_model)
    device = torch.device(args.device)

    torch.set_num_threads(compute_threads)
    local_pool = LocalPool(copy.deepcopy(experts), experts_cfg, policy=transport.cfg, device=device)
    local = make_layer(args, local_pool).to(device)
    remote = make_layer(args, transport.make_pool("bench", experts, experts_cfg))  # trainer side on the CPU
    # in turns, so that load from elsewhere on a shared machine hits both alike
    trainer_threads = trainer_side_threads(args)
    meter = CpuMeter(transport)
    with StepTimeline(transport.coordinator) as timeline:
        process_step = timeline.timed(lambda: (layer_step(remote, x_BTD), settled(transport)))
        steps = {
            "local": meter.timed("local", compute_threads, lambda: layer_step(local, x_BTD.to(device))),
            # owner steps included; the trainer on the cores its workers leave, as `python train.py` runs it
            "process": meter.timed("process", trainer_threads, process_step),
        }
        seconds = interleaved_medians(steps, repeats=args.repeats)
    local_s, remote_s = seconds["local"], seconds["process"]
    ratio = remote_s / local_s
    print(
        f"   local   (in the trainer on {args.device}, {compute_threads} torch threads)   {local_s * 1e3:8.1f} ms/step"
    )
    print(
        f"   process ({args.workers} workers on {args.device} × {args.threads} thread, trainer {trainer_threads} thread(s))"
        f" {remote_s * 1e3:8.1f} ms/step"
    )
    print(
        f"   process / local = {ratio:.3f}  (overhead {100 * (ratio - 1):+.1f} %, target ≤ 1.05 on 2 cores)"
    )
    if device.type == "cpu":
        workers_cpu = meter.workers_per_call("process")
        print_layer_cpu(meter.per_call("local"), compute_threads, meter.per_call("process"), workers_cpu)
        timeline.report(
            meter.per_call("process"),
            workers_cpu,
            (trainer_threads, args.threads),
            lambda least_s: f"process / local ≥ {least_s / local_s:.3f}",
        )
    failures = remote.pool.failure_counts
    if failures:
        print(f"   note: the process pool reported failures: {dict(failures)}")
    return local_s


def trainer_side_threads(args) -> int:
    """The trainer's torch threads beside its workers: the cores they leave free, at least one (what
    `moe.engine.cores.trainer_threads` gives a run with local worker processes)."""
    return max(1, (os.cpu_count() or 1) - args.workers * args.threads)


def on_threads(threads: int, step) -> None:
    torch.set_num_threads(threads)
    step()


def bench_curve(args, local_s: float) -> None:
    """The layer step over tcp without and with CURVE; steps alternate so both see the same load."""
    print(f"\n   CURVE cost: the same step over tcp, median of {args.repeats} alternating steps each")
    torch.manual_seed(0)
    experts = [FFN(args.d_model, args.d_ff) for _ in range(args.experts)]
    experts_cfg = ExpertsConfig(num=args.experts, d_ff=args.d_ff)
    x_BTD = torch.randn(1, args.tokens, args.d_model)
    transports, layers = {}, {}
    try:
        for auth in ("none", "curve"):
            transports[auth] = ProcessTransport(
                process_config(args, address="tcp", auth=auth), **TRAINER_SIDE
            )
            layers[auth] = make_layer(args, transports[auth].make_pool("bench", experts, experts_cfg))
        seconds = {auth: [] for auth in layers}
        for _ in range(args.repeats + 1):  # the first round warms up
            for auth, layer in layers.items():
                step = lambda layer=layer, auth=auth: on_threads(
                    trainer_side_threads(args), lambda: (layer_step(layer, x_BTD), settled(transports[auth]))
                )
                seconds[auth].append(timed(step))
    finally:
        for transport in transports.values():
            transport.close()
    median = {auth: statistics.median(times[1:]) for auth, times in seconds.items()}
    for auth, label in (("none", "tcp without CURVE"), ("curve", "tcp with CURVE   ")):
        print(
            f"   {label} {median[auth] * 1e3:8.1f} ms/step   process / local = {median[auth] / local_s:.3f}"
        )
    cost = median["curve"] / median["none"] - 1
    print(f"   CURVE adds {100 * cost:+.1f} % to the process layer step  (target ≤ +10 %)")


def timed(step) -> float:
    tick = time.perf_counter()
    step()
    return time.perf_counter() - tick


# --- 3. hivemind -------------------------------------------------------------------------------------


# hivemind's "ffn" expert is hidden -> 4·hidden -> hidden, the shape of ours
BATCH, HIDDEN, EXPERTS, TOP_K = 128, 512, 4, 2


def bench_hivemind(args) -> float | None:
    """samples/s of hivemind's RemoteMixtureOfExperts, or None (with the reason printed)."""
    try:
        import hivemind
        from hivemind.moe.server import background_server
    except ImportError as err:
        print(
            f"   skipped: hivemind is not importable ({err}); install the extra with `pip install .[compare]`"
        )
        return None
    try:
        # the uids must match the client's grid, and a client-mode DHT never finds them (the call hangs)
        uids = [f"expert.{i}" for i in range(EXPERTS)]
        with background_server(
            expert_uids=uids,
            expert_cls="ffn",
            hidden_dim=HIDDEN,
            device=args.device,
            num_handlers=args.workers,
        ) as server:
            dht = hivemind.DHT(initial_peers=server.addrs, start=True)
            moe = hivemind.RemoteMixtureOfExperts(
                in_features=HIDDEN, grid_size=(EXPERTS,), dht=dht, k_best=TOP_K, uid_prefix="expert.",
                forward_timeout=30.0, backward_timeout=30.0,
            )  # fmt: skip
            x_BD = torch.randn(BATCH, HIDDEN)
            seconds = median_seconds(lambda: moe(x_BD).sum().backward(), repeats=args.repeats)
            dht.shutdown()
    except Exception as err:  # a third-party stack: report, never crash the benchmark
        print(f"   skipped: hivemind failed to run ({type(err).__name__}: {err})")
        return None
    rate = BATCH / seconds
    print(f"   hivemind: {rate:,.0f} samples/s")
    return rate


def bench_ours_against_floor(args, transport: ProcessTransport) -> tuple[float, float]:
    """poimoe's step at hivemind's shape and the compute floor, timed in turns (the workers idle while
    the floor runs), so that load from elsewhere hits both alike; returns both in samples/s."""
    trainer_threads = trainer_side_threads(args)
    torch.manual_seed(0)
    experts = [FFN(HIDDEN, 4 * HIDDEN) for _ in range(EXPERTS)]
    layer = MoELayer(
        "hivemind-shape",
        router.build("topk", HIDDEN, EXPERTS, top_k=TOP_K),
        transport.make_pool("hivemind-shape", experts, ExpertsConfig(num=EXPERTS, d_ff=4 * HIDDEN)),
    )
    x_BTD = torch.randn(1, BATCH, HIDDEN)
    floor_step, share, rows = compute_floor_step(args)
    meter = CpuMeter(transport)
    with StepTimeline(transport.coordinator) as timeline:
        # the workers finish their owner steps inside "ours": left running, they would slow the floor
        ours_step = timeline.timed(lambda: (layer_step(layer, x_BTD), settled(transport)))
        steps = {
            "ours": meter.timed("ours", trainer_threads, ours_step),
            "floor": meter.timed("floor", args.threads, floor_step),
        }
        seconds = interleaved_medians(steps, repeats=max(args.repeats, 10))
    workers_cpu = meter.workers_per_call("ours")
    print(
        f"   poimoe process transport at that shape (trainer {trainer_threads} thread):"
        f" {seconds['ours'] * 1e3:.1f} ms → {BATCH / seconds['ours']:,.0f} samples/s"
    )
    print(
        f"   compute floor (a worker's share, {share} experts × {rows} rows fwd+bwd+clip+AdamW on"
        f" {args.threads} thread(s); no messaging, trunk or router): {seconds['floor'] * 1e3:.1f} ms"
        f" → {BATCH / seconds['floor']:,.0f} samples/s"
    )
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(
        f"   poimoe reaches {100 * seconds['floor'] / seconds['ours']:.0f} % of the compute floor"
        f"  (target ≥ 90 % on a quiet machine; timed in turns; load average {load})"
    )
    print_cpu_bound(meter.per_call("ours"), workers_cpu, meter.per_call("floor"))
    timeline.report(
        meter.per_call("ours"),
        workers_cpu,
        (trainer_threads, args.threads),
        lambda least_s: f"at best {100 * seconds['floor'] / least_s:.0f} % of the floor",
    )
    return BATCH / seconds["ours"], BATCH / seconds["floor"]


def compute_floor_step(args):
    """(step, experts, rows): one step of a worker's share of the expert arithmetic alone (forward,
    backward, clip and AdamW on ⌈E/workers⌉ experts, each with an even share of the batch·k rows), the
    rate no transport can beat if messaging, the trunk and the router were free and the workers ran
    side by side on their own cores."""
    device = torch.device("cuda:0" if args.device == "cuda" else args.device)
    share = -(-EXPERTS // args.workers)
    rows = -(-BATCH * TOP_K // EXPERTS)
    torch.manual_seed(0)
    settings = OptimizerSettings(lr=1e-3, grad_clip=1.0)
    owners = [ExpertOwner(FFN(HIDDEN, 4 * HIDDEN).to(device), settings) for _ in range(share)]
    x_aD = torch.randn(rows, HIDDEN, device=device)
    grad_aD = torch.randn(rows, HIDDEN, device=device)

    def worker_share() -> None:
        for owner in owners:
            owner.module(x_aD.detach().requires_grad_()).backward(grad_aD)
            owner.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return worker_share, share, rows


TRAINER_SIDE = {"device": torch.device("cpu"), "run_dir": None, "seed": 0}


def process_config(args, **overrides) -> ProcessTransportConfig:
    worker_device = "cuda:0" if args.device == "cuda" else args.device
    return ProcessTransportConfig(
        workers=args.workers, threads=args.threads, devices=[worker_device], **overrides
    )


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.hivemind_only:
        bench_hivemind(args)
        return
    keep_freed_memory()  # as `train()` does for its trainer (and every worker for itself)
    cfg = process_config(args)
    print(
        f"poimoe transport benchmark: torch {torch.__version__}, {torch.get_num_threads()} default threads, "
        f"{args.workers} workers × {args.threads} thread(s), address={cfg.address}"
    )
    transport = ProcessTransport(cfg, **TRAINER_SIDE)
    try:
        bench_round_trips(transport)
        local_s = bench_layer(args, transport)
    except BaseException:
        transport.close()
        raise
    bench_curve(args, local_s)
    try:
        print(
            f"\n3. against hivemind RemoteMixtureOfExperts (hidden {HIDDEN}, batch {BATCH}, {EXPERTS} experts,"
            f" k={TOP_K}, forward + backward + owner steps, experts on {args.device})"
        )
        ours, floor = bench_ours_against_floor(args, transport)
    finally:
        transport.close()
    theirs = hivemind_in_fresh_process(args)
    if theirs:
        print(f"   poimoe / hivemind = {ours / theirs:.1f}×  (target ≥ 50×)")
        print(
            f"   compute floor / hivemind = {floor / theirs:.1f}×  (the most any transport reaches with this worker layout here)"
        )


def hivemind_in_fresh_process(args, timeout_s: float = 300) -> float | None:
    """hivemind in its own interpreter: its server forks from a process that already runs our workers
    and ZeroMQ otherwise, and hangs there. Returns samples/s, or None with the reason printed."""
    command = [
        sys.executable, __file__, "--hivemind-only",
        "--workers", str(args.workers), "--repeats", str(args.repeats), "--device", args.device,
    ]  # fmt: skip
    # its own session, so a hang is ended with everything hivemind started (server, p2pd daemons)
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True
    )
    try:
        stdout, _ = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        print(f"   hivemind: skipped, no result within {timeout_s:.0f} s")
        return None
    print(stdout.rstrip())
    found = re.search(r"hivemind: ([\d,]+) samples/s", stdout)
    return float(found.group(1).replace(",", "")) if found else None


if __name__ == "__main__":
    main()
