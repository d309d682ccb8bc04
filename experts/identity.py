"""Participant identities: one Ed25519 key pair (a "hotkey") per participant — the subnet owner
(trainer/coordinator, ledger writer), each miner (worker) and each validator.

The signing key comes from `cryptography`; nothing here implements a cipher. ZeroMQ's CURVE transport
needs Curve25519 keys: they are derived from the Ed25519 pair by the standard birational map (the one
libsodium's `crypto_sign_ed25519_*_to_curve25519` uses), so a participant is named by one public key
and the coordinator's allow-list holds Ed25519 public keys only.

Key files hold the 32-byte private seed as hex on one line, mode 0600; `<path>.pub` holds the public
key as hex. A participant's public key, as text, is its `hotkey`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from experts.errors import IdentityError

_FIELD_PRIME = 2**255 - 19  # the prime of Curve25519 and edwards25519
PUBLIC_SUFFIX = ".pub"


@dataclass(frozen=True)
class Identity:
    """A participant's key pair. `hotkey` (public key, hex) names it everywhere."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != 32:
            raise IdentityError(f"an Ed25519 seed is 32 bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def seed(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

        return self.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @property
    def public_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def hotkey(self) -> str:
        return self.public_bytes.hex()

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    def curve_secret_key(self) -> bytes:
        """The X25519 private scalar of this key pair (SHA-512 of the seed, first half, clamped)."""
        scalar = bytearray(hashlib.sha512(self.seed).digest()[:32])
        scalar[0] &= 248
        scalar[31] &= 127
        scalar[31] |= 64
        return bytes(scalar)

    def curve_keys_z85(self) -> tuple[bytes, bytes]:
        """(public, secret) as ZeroMQ's CURVE options take them (Z85 text)."""
        from zmq.utils import z85

        return z85.encode(curve_public_key(self.hotkey)), z85.encode(self.curve_secret_key())

    def save(self, path: str | Path) -> Path:
        """Write the private seed (mode 0600, never wider) and `<path>.pub`; refuses to overwrite."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise IdentityError(f"{path}: a key file is already there; not overwriting it") from None
        with os.fdopen(fd, "w") as handle:
            handle.write(self.seed.hex() + "\n")
        public_key_path(path).write_text(self.hotkey + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Identity:
        """Read a key file written by `save`; refuses one that others can read."""
        path = Path(path)
        try:
            mode = path.stat().st_mode & 0o777
            text = path.read_text().strip()
        except OSError as err:
            raise IdentityError(f"{path}: cannot read the key file ({err.strerror})") from None
        if mode & 0o077:
            raise IdentityError(f"{path}: a private key must be readable by its owner only (mode {mode:o})")
        try:
            return cls.from_seed(bytes.fromhex(text))
        except ValueError:
            raise IdentityError(f"{path}: not a key file (expected 64 hex digits)") from None


def public_key_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + PUBLIC_SUFFIX)


def load_or_create(path: str | Path) -> Identity:
    """The identity at `path`, generated and saved there first when there is none."""
    path = Path(path)
    return Identity.load(path) if path.exists() else _saved(Identity.generate(), path)


def _saved(identity: Identity, path: Path) -> Identity:
    identity.save(path)
    return identity


def read_hotkey(text_or_path: str | Path) -> str:
    """A public key given as 64 hex digits or as the path of a `.pub` (or key) file, as hex."""
    text = str(text_or_path).strip()
    if not _is_hotkey(text):
        path = Path(text)
        if path.suffix != PUBLIC_SUFFIX and public_key_path(path).exists():
            path = public_key_path(path)
        try:
            text = path.read_text().strip()
        except OSError:
            raise IdentityError(
                f"{text_or_path}: neither a public key (64 hex digits) nor a readable .pub file"
            ) from None
    if not _is_hotkey(text):
        raise IdentityError(f"{text_or_path}: not a public key (expected 64 hex digits)")
    return text.lower()


def _is_hotkey(text: str) -> bool:
    return len(text) == 64 and all(ch in "0123456789abcdefABCDEF" for ch in text)


def verify_signature(hotkey: str, message: bytes, signature: bytes) -> bool:
    """Whether `signature` is `hotkey`'s signature of `message`; False for any malformed input."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(hotkey)).verify(signature, message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def curve_public_key(hotkey: str) -> bytes:
    """The X25519 public key (32 bytes) of an Ed25519 public key: u = (1 + y) / (1 − y) mod p."""
    raw = bytes.fromhex(hotkey)
    if len(raw) != 32:
        raise IdentityError(f"a public key is 32 bytes, got {len(raw)}")
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    if y == 1 or y >= _FIELD_PRIME:
        raise IdentityError("not a valid Ed25519 public key")
    u = (1 + y) * pow(1 - y, -1, _FIELD_PRIME) % _FIELD_PRIME
    return u.to_bytes(32, "little")


def curve_public_key_z85(hotkey: str) -> bytes:
    """`curve_public_key` as ZeroMQ's CURVE options and ZAP's User-Id carry it (Z85 text)."""
    from zmq.utils import z85

    return z85.encode(curve_public_key(hotkey))
