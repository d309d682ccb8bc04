"""Deterministic ledger drivers for the ledger tests (also run in child processes, so resumed and
uninterrupted runs see the same data). Not a test module: `tests.incentives.test_ledger*` import it."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import torch

from moe.errors import LedgerError
from moe.ledger import LedgerConfig, RewardLedger, ValidatorSpec
from tests.helpers import REPO

SUBNETS = {"layer0": ["honest", "honest", "lazy", "adversarial"], "layer1": ["honest", "noisy", "honest"]}
PROCESS_TIMEOUT_S = 60


def make_config(**overrides) -> LedgerConfig:
    validators = [
        ValidatorSpec(stake=500.0, behaviour="honest"),
        ValidatorSpec(stake=200.0, behaviour="cabal", cabal_miners=[3]),
        ValidatorSpec(stake=150.0, behaviour="random"),
        ValidatorSpec(stake=100.0, behaviour="lazy"),
        ValidatorSpec(stake=50.0, behaviour="weight_copier"),
    ]
    return LedgerConfig(**{"steps_per_block": 2, "tempo": 5, "validators": validators, **overrides})


def score_view_at(step: int, subnets=SUBNETS):
    def view(validator: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(step * 1000 + validator)
        return {
            name: torch.randn(len(labels), generator=generator)
            + torch.arange(len(labels), dtype=torch.float32)
            for name, labels in subnets.items()
        }

    return view


def failures_at(step: int) -> dict[str, torch.Tensor]:
    return {"layer0": torch.tensor([0, int(step % 3 == 0), 0, 1]), "layer1": torch.zeros(3)}


def drive(ledger: RewardLedger, first: int, last: int) -> None:
    for step in range(first, last + 1):
        ledger.after_step(step, score_view_at(step), failures_at(step))


def run_forever(path: str) -> None:
    """Child process: write a ledger until killed."""
    ledger = RewardLedger(path, make_config(), SUBNETS, seed=7)
    for step in range(1, 10**7):
        ledger.after_step(step, score_view_at(step), failures_at(step))
        time.sleep(0.0005)


def try_second_writer(path: str) -> None:
    """Child process: try to open a ledger another process holds; exit 3 with the error."""
    try:
        RewardLedger(path, make_config(), SUBNETS, seed=7)
    except LedgerError as error:
        print(error)
        sys.exit(3)
    sys.exit(0)


@contextlib.contextmanager
def child_process(function: str, *args: str):
    """Run ``function(*args)`` from this module in a child process; always kill it on the way out."""
    code = f"import sys; import tests.helpers.ledger_drivers as t; t.{function}(*sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=PROCESS_TIMEOUT_S)
        process.stdout.close()


def block_count(path: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            return conn.execute("SELECT COUNT(*) FROM blocks").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def balances(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT name, balance FROM accounts"))
    finally:
        conn.close()


def block_hashes(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute("SELECT hash FROM blocks ORDER BY height")]
    finally:
        conn.close()


def run_ledger(path: Path, last_step: int, cfg: LedgerConfig | None = None, subnets=SUBNETS) -> dict:
    with RewardLedger(path, cfg or make_config(), subnets, seed=7) as ledger:
        for step in range(1, last_step + 1):
            ledger.after_step(
                step, score_view_at(step, subnets), failures_at(step) if subnets is SUBNETS else None
            )
        return ledger.summary()


def write_ledger(path: Path) -> Path:
    """A finished ledger of 60 steps: 30 blocks, 6 epochs."""
    run_ledger(path, 60)
    return path
