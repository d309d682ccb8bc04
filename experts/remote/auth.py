"""Who may talk to the coordinator: the run's keys, a private folder, and ZeroMQ CURVE with an allow-list.

On `tcp` (and wherever `transport.auth=curve`), the coordinator's socket is a CURVE server: every
connection is encrypted and its client proves a key pair. A ZAP handler (pyzmq's `ThreadAuthenticator`,
a thread of its own) admits only keys on the `AllowList` — the configured miners' hotkeys and the keys
generated for the workers this run spawns — and stamps each admitted connection's frames with the
client's hotkey (`peer_hotkey`), so the coordinator knows who sent what. A stranger never completes
the handshake: it can send nothing and receives nothing.

Keys are the participants' Ed25519 identities (`experts.identity`); CURVE uses the Curve25519 keys
derived from them. Keys generated for the run, and the `ipc` socket, live in a `PrivateFolder`: a
fresh temporary folder of mode 0700, outside the run dir (nothing that copies or reports a run sees
it), removed when the transport closes. On `ipc` without CURVE (`auth=auto`), that folder is the
boundary: only this user's processes can reach the socket, and they could read the keys anyway.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from experts.errors import ConfigError
from experts.identity import Identity, curve_public_key_z85, load_or_create, read_hotkey

log = logging.getLogger(__name__)

AUTH_MODES = ("auto", "curve", "none")


def uses_curve(auth: str, address: str) -> bool:
    """Whether the transport authenticates with CURVE: `auto` means on tcp, not on ipc."""
    if auth not in AUTH_MODES:
        raise ConfigError(f"transport.auth={auth!r}; valid: {', '.join(AUTH_MODES)}")
    return auth == "curve" or (auth == "auto" and address == "tcp")


def sparse(count: int) -> bool:
    """Log the 1st, 2nd, 4th, 8th, … occurrence only: a flood of refusals must not flood the log."""
    return count & (count - 1) == 0


class PrivateFolder:
    """A temporary folder only this user can enter (mkdtemp makes it 0700), removed by `close()`."""

    def __init__(self):
        self.path = Path(tempfile.mkdtemp(prefix="poimoe-"))

    def key(self, name: str) -> tuple[Path, Identity]:
        """A key pair generated for participant `name` (file mode 0600), and its path."""
        path = self.path / "keys" / f"{name}.key"
        return path, load_or_create(path)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class AllowList:
    """The hotkeys the coordinator admits; ZAP asks `callback` about every connecting CURVE key."""

    def __init__(self, hotkeys: list[str] = ()):
        self.hotkeys: dict[bytes, str] = {}  # CURVE public key (Z85) → hotkey
        self.refused: Counter = Counter()  # handshakes refused, by CURVE key
        for hotkey in hotkeys:
            self.add(read_hotkey(hotkey))

    def add(self, hotkey: str) -> None:
        self.hotkeys[curve_public_key_z85(hotkey)] = hotkey

    def __contains__(self, hotkey: str) -> bool:
        return hotkey in self.hotkeys.values()

    def callback(self, domain: str, curve_key_z85: bytes) -> bool:
        if curve_key_z85 in self.hotkeys:
            return True
        self.refused[curve_key_z85] += 1
        if sparse(self.refused[curve_key_z85]):
            log.warning("refused a connection from a key not on the allow-list (CURVE key %s, %d times)",
                        curve_key_z85.decode(errors="replace"), self.refused[curve_key_z85])  # fmt: skip
        return False


class Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP thread with our allow-list; a connection's User-Id is its hotkey."""

    def __init__(self, context: zmq.Context, allow_list: AllowList):
        super().__init__(context, log=log)
        self.allow_list = allow_list

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.allow_list.hotkeys[z85.encode(client_public_key)]


def serve_curve(socket: zmq.Socket, identity: Identity, allow_list: AllowList) -> Authenticator:
    """Make `socket` a CURVE server admitting `allow_list` only. Call before `bind`: without a ZAP
    handler in the context, ZeroMQ would admit any client key."""
    authenticator = Authenticator(socket.context, allow_list)
    authenticator.start()
    authenticator.configure_curve_callback("*", credentials_provider=allow_list)
    public, secret = identity.curve_keys_z85()
    socket.curve_secretkey, socket.curve_publickey, socket.curve_server = secret, public, True
    return authenticator


def connect_curve(socket: zmq.Socket, identity: Identity, server_hotkey: str) -> None:
    """Make `socket` a CURVE client of the server whose hotkey is `server_hotkey`. Call before `connect`."""
    public, secret = identity.curve_keys_z85()
    socket.curve_secretkey, socket.curve_publickey = secret, public
    socket.curve_serverkey = curve_public_key_z85(server_hotkey)


def peer_hotkey(frame: zmq.Frame) -> str | None:
    """The hotkey ZAP admitted the sender of `frame` under; None on a connection without CURVE."""
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return None if user in (None, "", "anonymous") else user
