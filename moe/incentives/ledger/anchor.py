"""The ledger's head and its anchors: copies of (height, hash, signature) kept outside the ledger file.

The writer's head after a step is stored in every checkpoint (``RewardLedger.checkpoint_state``) and
in summary.json (the reward summary's ``head``); run_info.json names the writer's public key.
``verify`` of a run dir checks each anchor against the chain: an anchored height above the chain's
head means the ledger was cut back (truncated); an anchored hash that differs from the chain's block
at that height means the chain was rewritten after the anchor was taken.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe.errors import CheckpointError, LedgerError
from moe.incentives.ledger.signing import block_message, signed_by

LEDGER_FILE = "ledger.sqlite"


@dataclass(frozen=True)
class Anchor:
    """One copy of the writer's head, and where it was found."""

    source: str
    height: int
    hash: str
    signature: str
    writer: str


def head_of(conn: sqlite3.Connection) -> dict[str, Any]:
    """The last block's height, hash and signature, and the writer's public key."""
    height, digest, signature = conn.execute(
        "SELECT height, hash, signature FROM blocks ORDER BY height DESC LIMIT 1"
    ).fetchone()
    (writer,) = conn.execute("SELECT hotkey FROM accounts WHERE name = 'owner'").fetchone()
    return {"height": height, "hash": digest, "signature": signature, "writer": writer}


def anchor_from(source: str, head: Any) -> Anchor:
    """An ``Anchor`` from a stored head; ``LedgerError`` naming ``source`` when it is malformed."""
    fields = {"height": int, "hash": str, "signature": str, "writer": str}
    malformed = not isinstance(head, Mapping) or any(
        not isinstance(head.get(k), t) for k, t in fields.items()
    )
    if malformed or head["height"] < 0:
        raise LedgerError(f"{source}: the anchored ledger head is malformed: {head!r}")
    return Anchor(source, *(head[key] for key in fields))


def check_anchors(hashes: Sequence[str], writer: str, anchors: Sequence[Anchor]) -> None:
    """Raise ``LedgerError`` for the anchor that names the lowest bad block; ``hashes[h]`` is block h's."""
    faults = [fault for anchor in anchors if (fault := _fault(hashes, writer, anchor)) is not None]
    if faults:
        raise LedgerError(min(faults)[1])


def _fault(hashes: Sequence[str], writer: str, anchor: Anchor) -> tuple[int, str] | None:
    """(the block it names, the message) when the anchor contradicts the chain, else None."""
    head = len(hashes) - 1
    if anchor.writer != writer:
        return 0, f"block 0: {anchor.source} anchors a ledger signed by {anchor.writer}, this one by {writer}"
    if not signed_by(writer, block_message(anchor.height, anchor.hash), anchor.signature):
        return (
            anchor.height,
            f"block {anchor.height}: the head anchored in {anchor.source} is not the writer's",
        )
    if anchor.height > head:
        return head + 1, (
            f"block {head + 1}: missing: the chain ends at block {head} but {anchor.source} anchors block "
            f"{anchor.height} (the ledger was truncated)"
        )
    if hashes[anchor.height] != anchor.hash:
        return anchor.height, (
            f"block {anchor.height}: its hash differs from the head anchored in {anchor.source} "
            "(the chain was rewritten after that anchor)"
        )
    return None


def read_run_anchors(run_dir: Path) -> tuple[list[Anchor], str | None]:
    """The anchors of a run dir (summary.json, every checkpoint) and the writer run_info.json names."""
    from moe.engine.checkpoint import list_checkpoints, load_checkpoint
    from moe.engine.run_info import RUN_INFO_FILE, SUMMARY_FILE

    anchors = []
    summary = _read_json(run_dir / SUMMARY_FILE)
    if summary is not None and isinstance(summary.get("rewards"), Mapping) and "head" in summary["rewards"]:
        anchors.append(anchor_from(SUMMARY_FILE, summary["rewards"]["head"]))
    for path in list_checkpoints(run_dir):
        source = str(path.relative_to(run_dir))
        try:
            _, state = load_checkpoint(path)
        except CheckpointError as error:
            raise LedgerError(f"{source}: cannot read the anchored ledger head: {error}") from None
        if isinstance(state.get("ledger"), Mapping):
            anchors.append(anchor_from(source, state["ledger"].get("head")))
    run_info = _read_json(run_dir / RUN_INFO_FILE)
    writer = run_info.get("ledger_writer") if run_info is not None else None
    return anchors, writer if isinstance(writer, str) else None


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise LedgerError(f"{path.name}: cannot be read: {error}") from None
    return content if isinstance(content, dict) else None
