"""Failed audits in the ledger: their rows, the slashes they cost, and the bans repeated failures earn.

A block records every audit that failed during its steps (``audits`` rows: subnet, miner, step, the
check that failed and its evidence as JSON), hashed and signed with the block. For each miner with a
failure in the block, ``slash`` of its balance is burned (a ``payouts`` row, reason ``slash``); its
incentive at the subnet's next epoch is zeroed (the miners' pool goes to the others); and every
``ban_after``-th failure bans it (zero incentive) for the following 1, 2, 4, ... epochs. All of it is
a pure function of the recorded rows, so ``verify`` replays it with the writer's own functions.

Shape legend: M = miners of one subnet.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moe.errors import LedgerError

SLASH_REASON = "slash"
EVIDENCE_KEYS = ("gap", "tolerance", "step_gap", "copy_of", "replay_of", "reason")  # what readers see first
SLASH_SCALE = 10**9  # the slash fraction in parts per billion, so slashes are exact integer arithmetic


@dataclass(frozen=True)
class AuditPolicy:
    """What a failed audit costs: the fraction of balance slashed, failures per ban (0: never)."""

    slash: float = 0.0
    ban_after: int = 0

    @classmethod
    def from_meta(cls, value: str | None) -> AuditPolicy:
        if value is None:
            return cls()
        try:
            fields = json.loads(value)
            return cls(slash=float(fields["slash"]), ban_after=int(fields["ban_after"]))
        except (ValueError, KeyError, TypeError) as error:
            raise LedgerError(f"block 0: the recorded audit policy cannot be read: {error}") from None

    def meta(self) -> str:
        return json.dumps({"slash": self.slash, "ban_after": self.ban_after}, sort_keys=True)


@dataclass
class AuditState:
    """Per miner: failed audits since the subnet's last epoch, in all, bans so far and the last epoch
    (index) a ban covers."""

    num_miners: int
    since_epoch_M: list[int] = field(default_factory=list)
    total_M: list[int] = field(default_factory=list)
    bans_M: list[int] = field(default_factory=list)
    banned_until_M: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for counts in (self.since_epoch_M, self.total_M, self.bans_M):
            counts[:] = counts or [0] * self.num_miners
        self.banned_until_M[:] = self.banned_until_M or [-1] * self.num_miners

    def record(self, miner: int, epoch: int, policy: AuditPolicy) -> None:
        """One failed audit in a block of `epoch` (the index of the epoch that block belongs to)."""
        self.since_epoch_M[miner] += 1
        self.total_M[miner] += 1
        if policy.ban_after and self.total_M[miner] % policy.ban_after == 0:
            self.bans_M[miner] += 1
            self.banned_until_M[miner] = epoch + 2 ** (self.bans_M[miner] - 1)

    def barred(self, epoch: int) -> list[bool]:
        """Miners whose incentive at epoch `epoch` is zeroed: failed since the last epoch, or banned."""
        return [
            failed > 0 or until >= epoch
            for failed, until in zip(self.since_epoch_M, self.banned_until_M, strict=True)
        ]

    def epoch_settled(self) -> None:
        self.since_epoch_M[:] = [0] * self.num_miners


def audit_rows(height: int, failures: Sequence[Any], subnets: Sequence[str]) -> list[tuple[Any, ...]]:
    """The ``audits`` rows of a block from failed audits (objects with layer, expert, step, check, evidence)."""
    rows = []
    for failure in failures:
        if failure.layer not in subnets:
            raise LedgerError(
                f"a failed audit for unknown subnet {failure.layer!r}; subnets: {list(subnets)}"
            )
        evidence = json.dumps(failure.evidence, sort_keys=True, separators=(",", ":"), default=str)
        rows.append(
            (height, failure.layer, int(failure.expert), int(failure.step), str(failure.check), evidence)
        )
    return rows


def apply_audits(
    draft, states: Mapping[str, Any], rows: Sequence[tuple[Any, ...]], policy: AuditPolicy, tempo: int
) -> None:
    """Slash each miner with a failed audit in this block and note the failures in its subnet's state
    (``states``: subnet → ``SubnetState``); ``draft`` is the block's ``BlockDraft``."""
    epoch = -(-draft.height // tempo)  # the epoch this block's steps belong to
    slashed: set[tuple[str, int]] = set()
    for _, subnet, miner, _, _, evidence in rows:
        state = states.get(subnet)
        if state is None or not 0 <= miner < state.num_miners:
            raise LedgerError(f"block {draft.height}: a failed audit of unknown miner {subnet}/{miner}")
        try:
            json.loads(evidence)
        except ValueError:
            raise LedgerError(
                f"block {draft.height}: the evidence of an audit of {subnet}/{miner} is not JSON"
            ) from None
        state.audits.record(miner, epoch, policy)
        slashed.add((subnet, miner))
    for subnet, miner in sorted(slashed):
        account = f"miner/{subnet}/{miner}"
        amount = draft.balance(account) * round(policy.slash * SLASH_SCALE) // SLASH_SCALE  # integers only
        draft.move(subnet, account, SLASH_REASON, -amount)
        draft.burned += amount


def restore_audit_state(conn, state, policy: AuditPolicy, tempo: int) -> None:
    """Rebuild ``state.audits`` (a ``SubnetState``'s) from the recorded rows, as a reopened ledger needs."""
    (last_epoch_block,) = conn.execute(
        "SELECT COALESCE(MAX(block), 0) FROM epochs WHERE subnet = ?", (state.name,)
    ).fetchone()
    state.audits = AuditState(state.num_miners)
    for block, miner in conn.execute(
        "SELECT block, miner FROM audits WHERE subnet = ? ORDER BY block, step, miner", (state.name,)
    ):
        state.audits.record(miner, -(-block // tempo), policy)
    state.audits.since_epoch_M[:] = [0] * state.num_miners
    for miner, failed in conn.execute(
        "SELECT miner, COUNT(*) FROM audits WHERE subnet = ? AND block > ? GROUP BY miner",
        (state.name, last_epoch_block),
    ):
        state.audits.since_epoch_M[miner] = failed


def recorded_audits(conn) -> list[dict[str, Any]]:
    """Every failed audit a ledger records, with the slash of its block (units), for ``show`` and reports."""
    slashes = {
        (block, subnet, account): -amount
        for block, subnet, account, amount in conn.execute(
            "SELECT block, subnet, account, amount FROM payouts WHERE reason = ?", (SLASH_REASON,)
        )
    }
    accounts = dict(conn.execute("SELECT name, id FROM accounts"))
    audits = []
    for block, subnet, miner, step, kind, evidence in conn.execute(
        "SELECT block, subnet, miner, step, kind, evidence FROM audits ORDER BY block, subnet, miner, step"
    ):
        slash = slashes.get((block, subnet, accounts.get(f"miner/{subnet}/{miner}")), 0)
        audits.append({"block": block, "subnet": subnet, "miner": miner, "step": step, "check": kind,
                       "evidence": json.loads(evidence), "slashed": slash})  # fmt: skip
    return audits
