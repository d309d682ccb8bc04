"""Measure Yuma consensus, signed ledger commits and verification; print each number next to its target.

    python benchmarks/ledger.py [--repeats 21] [--blocks 3000]

Shape legend: V = validators, M = miners.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moe.incentives.consensus import yuma_epoch
from moe.ledger import LedgerConfig, RewardLedger, ValidatorSpec, verify_ledger

YUMA_TARGETS_MS = {(256, 64): 10.0, (4096, 256): 200.0}  # (miners, validators) -> ms
BLOCKS_PER_S_TARGET = 1000.0


def time_yuma(num_miners: int, num_validators: int, repeats: int, yuma3: bool) -> float:
    """Median wall time of one ``yuma_epoch`` in ms, with previous bonds, on random float32 inputs."""
    generator = torch.Generator().manual_seed(0)
    weights_VM = torch.rand(num_validators, num_miners, generator=generator)
    stake_V = torch.rand(num_validators, generator=generator)
    bonds_VM = yuma_epoch(weights_VM, stake_V, yuma3=yuma3).bonds
    samples = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        yuma_epoch(weights_VM, stake_V, bonds_VM, yuma3=yuma3, liquid_alpha=True if yuma3 else None)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples[1:]) * 1e3  # the first call warms up


def blocks_per_second(
    num_blocks: int, synchronous: str, tempo: int, commit_reveal: bool = False
) -> tuple[float, float]:
    """(blocks committed per second, blocks verified per second) for a ledger with 2 subnets × 8 miners
    and 3 validators; every block signed, every epoch's rows signed, verify replays everything."""
    subnets = {"layer0": ["honest"] * 8, "layer1": ["honest"] * 8}
    scores = {name: torch.linspace(-0.5, 1.0, 8) for name in subnets}
    with tempfile.TemporaryDirectory() as folder:
        cfg = LedgerConfig(
            tempo=tempo,
            synchronous=synchronous,
            commit_reveal=commit_reveal,
            keys_dir=str(Path(folder) / "keys"),
            validators=[
                ValidatorSpec(600.0, "honest"),
                ValidatorSpec(250.0, "random"),
                ValidatorSpec(150.0, "lazy"),
            ],
        )
        path = Path(folder) / "run" / "ledger.sqlite"
        ledger = RewardLedger(path, cfg, subnets, seed=0)
        start = time.perf_counter()
        for step in range(1, num_blocks + 1):
            ledger.after_step(step, lambda validator: scores)
        elapsed = time.perf_counter() - start
        ledger.close()
        start = time.perf_counter()
        verify_ledger(path)
        verify_elapsed = time.perf_counter() - start
    return num_blocks / elapsed, num_blocks / verify_elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--blocks", type=int, default=3000)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for (num_miners, num_validators), target_ms in YUMA_TARGETS_MS.items():
        for yuma3 in (False, True):
            median_ms = time_yuma(num_miners, num_validators, args.repeats, yuma3)
            mode = "yuma3+liquid alpha" if yuma3 else "yuma2"
            verdict = "ok" if median_ms <= target_ms else "MISSED"
            print(
                f"yuma_epoch {num_miners:>5} miners x {num_validators:>3} validators ({mode:<18}): "
                f"{median_ms:8.2f} ms median  (target <= {target_ms:.0f} ms: {verdict})"
            )
    for synchronous, tempo, commit_reveal, label in (
        ("normal", 10, False, "epoch every 10 blocks"),
        ("normal", 10, True, "epochs, commit-reveal"),
        ("normal", 10**9, False, "no epochs"),
        ("full", 10, False, "epoch every 10 blocks"),
        ("full", 10**9, False, "no epochs"),
    ):
        rate, verify_rate = blocks_per_second(args.blocks, synchronous, tempo, commit_reveal)
        verdict = "ok" if rate >= BLOCKS_PER_S_TARGET else "MISSED"
        print(
            f"ledger commits, WAL synchronous={synchronous:<6} ({label:<21}): {rate:8.0f} blocks/s  "
            f"(target >= {BLOCKS_PER_S_TARGET:.0f}: {verdict}); verify {verify_rate:8.0f} blocks/s"
        )


if __name__ == "__main__":
    main()
