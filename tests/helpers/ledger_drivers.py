"""Deterministic ledger drivers for the ledger tests (also run in child processes, so resumed and
uninterrupted runs see the same data). Not a test module: `tests.incentives.test_ledger*` import it."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from experts.identity import Identity
from moe.engine.checkpoint import save_checkpoint
from moe.errors import LedgerError
from moe.incentives.ledger.schema import GENESIS_PREV_HASH, HASHED_TABLES, block_hash
from moe.incentives.ledger.signing import WRITER_KEY_FILE, block_message
from moe.ledger import LedgerConfig, RewardLedger, ValidatorSpec, default_keys_dir
from tests.helpers import REPO

SUBNETS = {"layer0": ["honest", "honest", "lazy", "adversarial"], "layer1": ["honest", "noisy", "honest"]}
PROCESS_TIMEOUT_S = 60


@dataclass(frozen=True)
class Charge:
    """A compute charge as the ledger takes it: a stand-in for `experts.market.ComputeCharge` (issue 16's
    part M1), with the same fields."""

    provider: str
    hotkey: str
    layer: str
    tokens: int
    price_per_1k_units: int


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
    with supervised([sys.executable, "-c", code, *args]) as process:
        yield process


@contextlib.contextmanager
def training_process(*overrides: str, cwd: Path = REPO):
    """``python train.py <overrides>`` in a child process; always killed on the way out."""
    with supervised([sys.executable, str(REPO / "train.py"), *overrides], cwd=cwd) as process:
        yield process


@contextlib.contextmanager
def supervised(command: list[str], cwd: Path = REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
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


# ---------------------------------------------------------------------------------------------------------
# Attacks on a written ledger: what someone with write access to the file (and maybe the writer's key) does


def block_rows(conn: sqlite3.Connection, height: int) -> dict[str, list[tuple]]:
    """The rows block ``height`` hashes, per table (genesis: meta and accounts)."""
    rows = {}
    for table, (columns, block_column) in HASHED_TABLES.items():
        select = f"SELECT {', '.join(columns)} FROM {table}"
        if block_column is None:
            rows[table] = conn.execute(select).fetchall() if height == 0 else []
        else:
            rows[table] = conn.execute(f"{select} WHERE {block_column} = ?", (height,)).fetchall()
    return rows


def rehash_chain(path: Path, sign_with: Identity | None = None) -> None:
    """Recompute every block's hash and link with the public hash function, as a forger would; with
    ``sign_with`` (the writer's key, stolen) also re-sign every block."""
    conn = sqlite3.connect(path)
    with conn:
        prev_hash = GENESIS_PREV_HASH
        blocks = conn.execute("SELECT height, step, emission, issuance, burned FROM blocks ORDER BY height")
        for height, step, emission, issuance, burned in blocks.fetchall():
            digest = block_hash(height, step, emission, issuance, burned, prev_hash, block_rows(conn, height))
            conn.execute(
                "UPDATE blocks SET prev_hash = ?, hash = ? WHERE height = ?", (prev_hash, digest, height)
            )
            if sign_with is not None:
                signature = sign_with.sign(block_message(height, digest)).hex()
                conn.execute("UPDATE blocks SET signature = ? WHERE height = ?", (signature, height))
            prev_hash = digest
    conn.close()


def writer_key() -> Identity:
    """The writer's key of the test session (``POIMOE_KEYS_DIR``)."""
    return Identity.load(default_keys_dir() / WRITER_KEY_FILE)


def tamper(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path)
    with conn:
        for statement in statements:
            conn.execute(statement)
    conn.close()


def anchor_run_dir(run_dir: Path, ledger: RewardLedger, step: int) -> None:
    """Anchor the ledger's head as a run does: in a checkpoint and in summary.json."""
    save_checkpoint(run_dir, step, {"ledger": ledger.checkpoint_state()}, keep=10)
    (run_dir / "summary.json").write_text(json.dumps({"rewards": ledger.summary()}))


# ---------------------------------------------------------------------------------------------------------
# Weight copying: miners whose quality changes every few epochs, and the copier's share of dividends

COPYING_SUBNETS = {"layer0": ["honest"] * 8}


def copying_config(commit_reveal: bool, tempo: int = 4) -> LedgerConfig:
    validators = [
        ValidatorSpec(stake=600.0, behaviour="honest"),
        ValidatorSpec(stake=250.0, behaviour="honest"),
        ValidatorSpec(stake=150.0, behaviour="weight_copier"),
    ]
    return LedgerConfig(steps_per_block=1, tempo=tempo, validators=validators, commit_reveal=commit_reveal)


def switching_view(step: int, steps_per_phase: int):
    """Every validator sees each miner's quality (redrawn every ``steps_per_phase`` steps) plus its own noise."""
    quality_M = torch.rand(8, generator=torch.Generator().manual_seed((step - 1) // steps_per_phase))

    def view(validator: int) -> dict[str, torch.Tensor]:
        noise_M = torch.randn(8, generator=torch.Generator().manual_seed(10 * step + validator))
        return {"layer0": quality_M + 0.05 * noise_M}

    return view


def copier_dividend_share(path: Path, commit_reveal: bool, epochs: int, epochs_per_phase: int) -> float:
    """Write a ledger of ``epochs`` epochs; the copier's share of everything paid to validators."""
    cfg = copying_config(commit_reveal)
    with RewardLedger(path, cfg, COPYING_SUBNETS, seed=0) as ledger:
        for step in range(1, epochs * cfg.tempo + 1):
            ledger.after_step(step, switching_view(step, epochs_per_phase * cfg.tempo))
    paid = {name: units for name, units in balances(path).items() if name.startswith("validator/")}
    return paid["validator/2"] / sum(paid.values())
