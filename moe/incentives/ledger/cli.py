"""The ledger's command line: ``python -m moe.ledger verify PATH | show PATH | export PATH [--out DIR]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moe.errors import LedgerError
from moe.incentives.ledger.verify import export_ledger, read_summary, verify_ledger


def _format_summary(path: Path, summary: Mapping[str, Any]) -> str:
    lines = [
        f"ledger {path}: {summary['blocks']} blocks, {summary['epochs']} epochs, "
        f"issuance {summary['issuance_tokens']:.9f} tokens, burned {summary['burned_tokens']:.9f} tokens",
        "balances by role (tokens):",
    ]
    lines += [f"  {role:<28} {amount['tokens']:>20.9f}" for role, amount in summary["by_role"].items()]
    lines.append("balances by behaviour (tokens):")
    lines += [f"  {key:<28} {amount['tokens']:>20.9f}" for key, amount in summary["by_behaviour"].items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m moe.ledger verify PATH | show PATH | export PATH [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m moe.ledger", description="Inspect a poimoe reward ledger."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("verify", help="recompute the hash chain and the invariant").add_argument("path")
    commands.add_parser("show", help="print balances by role and behaviour").add_argument("path")
    export = commands.add_parser("export", help="write every table as CSV")
    export.add_argument("path")
    export.add_argument("--out", default=None, help="output folder (default: <ledger stem>_csv next to it)")
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            print(verify_ledger(args.path))
        elif args.command == "show":
            print(_format_summary(Path(args.path), read_summary(args.path)))
        else:
            for target in export_ledger(args.path, args.out):
                print(target)
    except LedgerError as error:
        print(f"ledger error: {error}", file=sys.stderr)
        return 1
    return 0
