"""The ledger's command line: ``python -m moe.ledger verify PATH [--writer KEY] | show PATH [--payments N] | export PATH [--out DIR]``.

PATH is a run dir (its ``ledger.sqlite``; ``verify`` then also checks the heads anchored in the run's
checkpoints and summary.json) or a ledger file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experts.errors import IdentityError
from experts.identity import read_hotkey
from moe.errors import LedgerError
from moe.incentives.ledger.anchor import LEDGER_FILE
from moe.incentives.ledger.audits import EVIDENCE_KEYS
from moe.incentives.ledger.emission import TOKEN
from moe.incentives.ledger.payments import recorded_payments
from moe.incentives.ledger.schema import connect_read_only, has_tables
from moe.incentives.ledger.summary import export_ledger, read_summary
from moe.incentives.ledger.verify import verify_run


def _format_summary(path: Path, summary: Mapping[str, Any]) -> str:
    lines = [
        f"ledger {path}: {summary['blocks']} blocks, {summary['epochs']} epochs, "
        f"issuance {summary['issuance_tokens']:.9f} tokens, burned {summary['burned_tokens']:.9f} tokens",
        "balances by role (tokens):",
    ]
    lines += [f"  {role:<28} {amount['tokens']:>20.9f}" for role, amount in summary["by_role"].items()]
    lines.append("balances by behaviour (tokens):")
    lines += [f"  {key:<28} {amount['tokens']:>20.9f}" for key, amount in summary["by_behaviour"].items()]
    audits = summary.get("audits", [])
    lines.append(
        f"failed audits: {len(audits)} (slashed {sum(a['slashed'] for a in audits) / TOKEN:.9f} tokens)"
    )
    lines += [
        f"  block {a['block']:>5} step {a['step']:>6} miner/{a['subnet']}/{a['miner']:<3} {a['check']:<10} "
        f"slashed {a['slashed'] / TOKEN:.9f}  {_evidence(a['evidence'])}"
        for a in audits
    ]
    return "\n".join(lines)


def _format_payments(summary: Mapping[str, Any], payments: Sequence[Mapping[str, Any]], last: int) -> str:
    """The treasury, compute paid per provider, then the `last` payments block by block (all: -1)."""
    totals = summary["payments"]
    lines = [
        f"compute payments: {len(payments)} (paid {totals['paid'] / TOKEN:.9f} tokens, unpaid "
        f"{totals['unpaid'] / TOKEN:.9f}; treasury funded {totals['funded'] / TOKEN:.9f}, holds "
        f"{totals['treasury'] / TOKEN:.9f})",
        "compute paid by provider (tokens processed, tokens paid, unpaid):",
    ]
    lines += [
        f"  provider/{name:<19} {p['tokens']:>12} {p['paid'] / TOKEN:>20.9f} {p['unpaid'] / TOKEN:>16.9f}"
        for name, p in totals["by_provider"].items()
    ]
    shown = list(payments) if last < 0 else list(payments)[len(payments) - min(last, len(payments)) :]
    if len(shown) < len(payments):
        lines.append(
            f"last {len(shown)} of {len(payments)} payments (--payments -1 lists all; export writes them as CSV):"
        )
    lines += [
        f"  block {p['block']:>5} step {p['step']:>6} {p['subnet']:<8} provider/{p['provider']:<16} "
        f"tokens {p['tokens']:>9} price/1k {p['price_per_1k_units'] / TOKEN:.9f} paid {p['amount'] / TOKEN:.9f} "
        f"unpaid {p['unpaid'] / TOKEN:.9f}"
        for p in shown
    ]
    return "\n".join(lines)


def _show(path: Path, last_payments: int = 20) -> str:
    summary = read_summary(path)
    conn = connect_read_only(path)
    try:
        payments = recorded_payments(conn) if has_tables(conn) else []
    finally:
        conn.close()
    return _format_summary(path, summary) + "\n" + _format_payments(summary, payments, last_payments)


def _evidence(evidence: Mapping[str, Any]) -> str:
    """The evidence a reader needs first: the gap, and what the answer copied or replayed."""
    return ", ".join(f"{key}={evidence[key]}" for key in EVIDENCE_KEYS if key in evidence)


def ledger_file(path: str | Path) -> Path:
    """The ledger of a run dir, or the file itself."""
    path = Path(path)
    return path / LEDGER_FILE if path.is_dir() else path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m moe.ledger verify PATH [--writer KEY] | show PATH [--payments N] | export PATH [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m moe.ledger",
        description="Inspect a poimoe reward ledger (a run dir or a ledger file).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser(
        "verify", help="check hashes, signatures, splits, payouts, Yuma and the anchored heads"
    )
    verify.add_argument("path")
    verify.add_argument(
        "--writer",
        default=None,
        help="the public key that must have signed it (64 hex digits or a .pub file)",
    )
    show = commands.add_parser(
        "show", help="print balances by role and behaviour, failed audits and slashes, compute payments"
    )
    show.add_argument("path")
    show.add_argument(
        "--payments", type=int, default=20, help="list the last N compute payments (default 20; -1: all)"
    )
    export = commands.add_parser("export", help="write every table as CSV")
    export.add_argument("path")
    export.add_argument("--out", default=None, help="output folder (default: <ledger stem>_csv next to it)")
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            print(verify_run(args.path, writer=read_hotkey(args.writer) if args.writer else None))
        elif args.command == "show":
            print(_show(ledger_file(args.path), args.payments))
        else:
            for target in export_ledger(ledger_file(args.path), args.out):
                print(target)
    except (LedgerError, IdentityError) as error:
        print(f"ledger error: {error}", file=sys.stderr)
        return 1
    return 0
