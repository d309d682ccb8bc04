"""Who signs what in the ledger: the writer's key, the validators' keys, and the exact bytes they sign.

The ledger writer (the subnet owner: the trainer) signs every block; each validator signs its weight
submission (a plain row, or with commit-reveal a commit and later its reveal). Keys are Ed25519
(``experts.identity``); the writer's private key lives in a keys folder outside the run dir (see
``keys_dir``), and only public keys ("hotkeys") enter the ledger.

The simulated validators' keys are derived from the writer's key and the run's seed (HKDF), so one
secret per machine suffices and a resumed run signs with the same keys; a real validator would hold
its own. Commit salts are derived from the validator's own key (HMAC), so only it can open a commit.

Every signed message is canonical JSON that names the ledger (its genesis hash), so a signature
cannot be replayed into another ledger, block, subnet or role.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from experts.errors import IdentityError
from experts.identity import Identity, load_or_create, verify_signature
from moe.errors import ConfigError, LedgerError

KEYS_DIR_ENV = "POIMOE_KEYS_DIR"
WRITER_KEY_FILE = "ledger_writer.key"
SUBMISSION_KINDS = ("weights", "commit", "reveal")


def default_keys_dir() -> Path:
    """``$POIMOE_KEYS_DIR``, else ``$XDG_CONFIG_HOME/poimoe/keys``, else ``~/.config/poimoe/keys``."""
    if os.environ.get(KEYS_DIR_ENV):
        return Path(os.environ[KEYS_DIR_ENV]).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config_home).expanduser() / "poimoe" / "keys"


def writer_key_path(keys_dir: str | os.PathLike[str] | None, run_dir: Path) -> Path:
    """Where the writer's private key lives; ``ConfigError`` when that is inside the run dir.

    A key inside the run dir would travel with every copy of the run, and whoever holds the run dir
    could re-sign a rewritten ledger.
    """
    folder = Path(keys_dir).expanduser() if keys_dir else default_keys_dir()
    folder, run_dir = folder.resolve(), Path(run_dir).resolve()
    if folder == run_dir or run_dir in folder.parents:
        raise ConfigError(
            f"ledger.keys_dir {folder} lies inside the run dir {run_dir}; keep the writer's key outside it"
        )
    return folder / WRITER_KEY_FILE


def load_writer(keys_dir: str | os.PathLike[str] | None, run_dir: Path) -> Identity:
    """The writer's key pair, created (mode 0600) on first use."""
    path = writer_key_path(keys_dir, run_dir)
    try:
        return load_or_create(path)
    except IdentityError as error:
        raise LedgerError(f"ledger writer key: {error}") from None


def validator_identity(writer: Identity, seed: int, validator: int) -> Identity:
    """Simulated validator ``validator``'s key for a run with ``seed``: HKDF of the writer's key."""
    info = f"poimoe ledger validator key/{seed}/{validator}".encode()
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(writer.seed)
    return Identity.from_seed(derived)


def canonical(content: dict) -> bytes:
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def block_message(height: int, digest: str) -> bytes:
    """What the writer signs for a block: its height and hash (the hash covers every earlier block)."""
    return canonical({"kind": "poimoe-ledger-block", "height": height, "hash": digest})


def submission_message(
    ledger: str, block: int, subnet: str, validator: int, kind: str, **payload: object
) -> bytes:
    """What a validator signs for one submission: ``weights`` (row), ``commit`` (digest) or ``reveal``
    (salt, row), at epoch ``block`` of ``subnet`` in the ledger whose genesis hash is ``ledger``."""
    if kind not in SUBMISSION_KINDS:
        raise ValueError(f"unknown submission kind {kind!r}; valid: {SUBMISSION_KINDS}")
    header = {"ledger": ledger, "block": block, "subnet": subnet, "validator": validator, "kind": kind}
    return canonical({**header, **payload})


def commit_digest(ledger: str, block: int, subnet: str, validator: int, salt: str, row: Sequence[int]) -> str:
    """The salted hash a validator commits at epoch ``block``; its reveal must reproduce it."""
    content = {"ledger": ledger, "block": block, "subnet": subnet, "validator": validator, "salt": salt}
    return hashlib.sha256(canonical({**content, "row": list(row)})).hexdigest()


def commit_salt(validator: Identity, ledger: str, block: int, subnet: str) -> str:
    """A secret salt only the validator can compute (HMAC of its key), the same after a resume."""
    message = canonical({"ledger": ledger, "block": block, "subnet": subnet})
    return hmac.new(validator.seed, b"poimoe commit salt/" + message, hashlib.sha256).hexdigest()


def sign(identity: Identity, message: bytes) -> str:
    return identity.sign(message).hex()


def signed_by(hotkey: str, message: bytes, signature: str) -> bool:
    """Whether ``signature`` (hex) is ``hotkey``'s signature of ``message``; False for malformed input."""
    try:
        raw = bytes.fromhex(signature)
    except (TypeError, ValueError):
        return False
    return verify_signature(hotkey, message, raw)
