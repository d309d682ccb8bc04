"""Validators' signed weight submissions, plain or commit-reveal, and their verification.

Without commit-reveal, each validator signs the row it sets at an epoch (``weights``) and Yuma counts
it at once. With commit-reveal (``ledger.commit_reveal``), at epoch e each validator publishes only a
signed ``commit``: the SHA-256 of its row and a secret salt. At epoch e+1 it publishes the signed
``reveal`` (the salt; the row goes to ``weights``), and Yuma at e+1 counts the revealed rows only, so a
validator that copies what is public copies weights one epoch staler than in the plain scheme. A
validator with nothing to reveal (the first epoch; a resumed run that lost the unrevealed rows)
counts as an all-zero row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from experts.identity import Identity
from moe.errors import LedgerError
from moe.incentives.ledger.signing import (
    commit_digest,
    commit_salt,
    sign,
    signed_by,
    submission_message,
)

Commit = tuple[int, str]  # (the epoch block of a commit, its digest)


@dataclass
class Validators:
    """The simulated validators of one ledger: their keys, and how they submit rows."""

    identities: Sequence[Identity]
    ledger: str  # the genesis hash, named in every signed message
    commit_reveal: bool
    tempo: int

    def submit(
        self,
        draft,
        subnet: str,
        chosen_rows: Sequence[Sequence[int]],
        unrevealed: Mapping[int, Sequence[int]],
    ) -> list[list[int]]:
        """Sign this epoch's submissions into ``draft``; return the rows Yuma counts now.

        ``unrevealed`` holds, with commit-reveal, each validator's row committed at the last epoch.
        """
        block, rows = draft.height, draft.rows["submissions"]
        if not self.commit_reveal:
            for validator, row in enumerate(chosen_rows):
                rows.append(self._signed(block, subnet, validator, "weights", ("", ""), row=list(row)))
            return [list(row) for row in chosen_rows]
        counted = [[0] * len(row) for row in chosen_rows]
        for validator, row in sorted(unrevealed.items()):
            salt = self.salt(validator, block - self.tempo, subnet)
            rows.append(
                self._signed(block, subnet, validator, "reveal", ("", salt), salt=salt, row=list(row))
            )
            counted[validator] = list(row)
        for validator, row in enumerate(chosen_rows):
            digest = self.digest(validator, block, subnet, row)
            rows.append(self._signed(block, subnet, validator, "commit", (digest, ""), digest=digest))
        return counted

    def salt(self, validator: int, block: int, subnet: str) -> str:
        return commit_salt(self.identities[validator], self.ledger, block, subnet)

    def digest(self, validator: int, block: int, subnet: str, row: Sequence[int]) -> str:
        """The commit of ``row`` by ``validator`` at epoch ``block``."""
        return commit_digest(self.ledger, block, subnet, validator, self.salt(validator, block, subnet), row)

    def _signed(
        self, block: int, subnet: str, validator: int, kind: str, stored: tuple[str, str], **payload: object
    ) -> tuple:
        """A ``submissions`` row: ``stored`` is its (digest, salt) columns, ``payload`` what is signed."""
        message = submission_message(self.ledger, block, subnet, validator, kind, **payload)
        return (block, subnet, validator, kind, *stored, sign(self.identities[validator], message))


def check_submissions(
    height: int,
    subnet: str,
    rows_u16: Sequence[Sequence[int]],
    submissions: Sequence[tuple],
    prior_commits: Mapping[int, Commit],
    hotkeys: Sequence[str],
    ledger: str,
    commit_reveal: bool,
) -> dict[int, Commit]:
    """Check one epoch's submissions of one subnet; return its commits (validator → (block, digest)).

    ``rows_u16`` are the rows Yuma counted (from ``weights``); ``prior_commits`` the commits of the
    subnet's last epoch. Raises ``LedgerError`` naming the block, subnet and validator.
    """
    where = f"block {height}: subnet {subnet!r}"
    by_kind: dict[str, dict[int, tuple]] = {"weights": {}, "commit": {}, "reveal": {}}
    for row in submissions:
        _, _, validator, kind, *_ = row
        if kind not in by_kind or not 0 <= validator < len(hotkeys):
            raise LedgerError(f"{where}: a submission of unknown kind {kind!r} or validator {validator}")
        by_kind[kind][validator] = row
    expected = ("commit", "reveal") if commit_reveal else ("weights",)
    stray = [kind for kind in by_kind if kind not in expected and by_kind[kind]]
    if stray:
        raise LedgerError(f"{where}: {stray[0]} submissions in a ledger with commit_reveal={commit_reveal}")
    if commit_reveal:
        return _check_commit_reveal(where, height, subnet, rows_u16, by_kind, prior_commits, hotkeys, ledger)
    for validator, row in enumerate(rows_u16):
        submitted = by_kind["weights"].get(validator)
        message = submission_message(ledger, height, subnet, validator, "weights", row=list(row))
        _require_signed(where, validator, "weights", submitted, message, hotkeys)
    return {}


def _check_commit_reveal(
    where: str,
    height: int,
    subnet: str,
    rows_u16: Sequence[Sequence[int]],
    by_kind: Mapping[str, Mapping[int, tuple]],
    prior_commits: Mapping[int, Commit],
    hotkeys: Sequence[str],
    ledger: str,
) -> dict[int, Commit]:
    for validator, row in enumerate(rows_u16):
        reveal = by_kind["reveal"].get(validator)
        if reveal is None:
            if any(row):
                raise LedgerError(f"{where}: validator {validator}'s weights were counted without a reveal")
            continue
        if validator not in prior_commits:
            raise LedgerError(f"{where}: validator {validator} revealed without a commit at the last epoch")
        salt = reveal[5]
        message = submission_message(ledger, height, subnet, validator, "reveal", salt=salt, row=list(row))
        _require_signed(where, validator, "reveal", reveal, message, hotkeys)
        commit_block, digest = prior_commits[validator]
        if commit_digest(ledger, commit_block, subnet, validator, salt, row) != digest:
            raise LedgerError(f"{where}: validator {validator}'s revealed weights do not match its commit")
    commits = {}
    for validator in range(len(hotkeys)):
        commit = by_kind["commit"].get(validator)
        digest = commit[4] if commit is not None else ""
        message = submission_message(ledger, height, subnet, validator, "commit", digest=digest)
        _require_signed(where, validator, "commit", commit, message, hotkeys)
        commits[validator] = (height, digest)
    return commits


def _require_signed(
    where: str, validator: int, kind: str, submitted: tuple | None, message: bytes, hotkeys: Sequence[str]
) -> None:
    if submitted is None:
        raise LedgerError(f"{where}: validator {validator}'s {kind} submission is missing")
    if not signed_by(hotkeys[validator], message, submitted[6]):
        raise LedgerError(f"{where}: validator {validator}'s {kind} signature does not match its key")
