"""Identities: key files kept private, signatures that fail on any change, CURVE keys that agree with
the libraries' own derivations."""

import os

import pytest
import zmq
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from experts.errors import IdentityError
from experts.identity import (
    Identity,
    curve_public_key,
    load_or_create,
    public_key_path,
    read_hotkey,
    verify_signature,
)


def test_signature_verifies_only_the_signed_message_under_the_signers_key():
    alice, mallory = Identity.generate(), Identity.generate()
    signature = alice.sign(b"block 7")
    assert verify_signature(alice.hotkey, b"block 7", signature)
    assert not verify_signature(alice.hotkey, b"block 8", signature)
    assert not verify_signature(mallory.hotkey, b"block 7", signature)
    assert not verify_signature(alice.hotkey, b"block 7", signature[:-1] + bytes([signature[-1] ^ 1]))
    assert not verify_signature("not hex", b"block 7", signature)


def test_curve_keys_match_x25519_and_zeromq_derivations():
    for _ in range(5):
        identity = Identity.generate()
        x25519_public = (
            X25519PrivateKey.from_private_bytes(identity.curve_secret_key())
            .public_key()
            .public_bytes(Encoding.Raw, PublicFormat.Raw)
        )
        assert curve_public_key(identity.hotkey) == x25519_public
        public_z85, secret_z85 = identity.curve_keys_z85()
        assert zmq.curve_public(secret_z85) == public_z85


def test_key_file_is_private_and_round_trips(tmp_path):
    identity = Identity.generate()
    path = identity.save(tmp_path / "keys" / "miner0.key")
    assert path.stat().st_mode & 0o777 == 0o600
    assert Identity.load(path).hotkey == identity.hotkey
    assert read_hotkey(public_key_path(path)) == identity.hotkey
    assert read_hotkey(path) == identity.hotkey  # a key file's path names its public half
    assert read_hotkey(identity.hotkey.upper()) == identity.hotkey
    with pytest.raises(IdentityError, match="already there"):
        Identity.generate().save(path)
    assert Identity.load(path).hotkey == identity.hotkey  # not overwritten
    assert load_or_create(path).hotkey == identity.hotkey


def test_bad_key_files_are_refused_naming_the_file(tmp_path):
    path = Identity.generate().save(tmp_path / "k")
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="owner only"):
        Identity.load(path)
    garbled = tmp_path / "garbled"
    garbled.write_text("zz" * 32)
    os.chmod(garbled, 0o600)
    with pytest.raises(IdentityError, match="garbled"):
        Identity.load(garbled)
    with pytest.raises(IdentityError, match="missing"):
        Identity.load(tmp_path / "missing")
    with pytest.raises(IdentityError, match="public key"):
        read_hotkey("abc")
