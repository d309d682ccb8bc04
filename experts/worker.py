"""`python -m experts.worker`: the public entry point of a miner process (see `experts.remote.worker`).

    python -m experts.worker keygen PATH         # a key pair: PATH (mode 0600) and PATH.pub; prints the hotkey
    python -m experts.worker --coordinator tcp://HOST:PORT --coordinator-key HEX_OR_PATH --key PATH \\
        --name NAME --state-dir DIR [--device cuda:1] [--threads 1] [--max-expert-mb 4096] ...

A hand-started worker joins a CURVE coordinator (`transport.address=tcp`) with its own key, whose
hotkey the trainer lists in `transport.allowed_keys`, and the coordinator's public key (the trainer
logs it; `transport.key` makes it stable). Its limits (`--max-*`) and its state dir are its own: the
coordinator cannot widen or move them.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import logging
import os
import signal
import socket
import sys

import torch

from experts.errors import PoimoeError
from experts.identity import Identity, load_or_create, read_hotkey
from experts.remote.settings import WorkerLimits
from experts.remote.worker import Worker

log = logging.getLogger("experts.remote.worker")


def keygen(path: str) -> str:
    """Make a key pair at `path` (refuses to overwrite one); returns its hotkey."""
    identity = Identity.generate()
    identity.save(path)
    return identity.hotkey


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experts.worker", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    limits = dataclasses.asdict(WorkerLimits())
    add("--coordinator", required=True, help="tcp://HOST:PORT or ipc://PATH of the trainer")
    add("--coordinator-key", default=None, help="the coordinator's public key (hex, or a .pub file): CURVE")
    add("--key", default=None, help="this worker's key file (made there if missing): CURVE")
    add("--name", default=None, help="stable worker name; reuse it to rejoin (default host-pid)")
    add(
        "--state-dir",
        default=None,
        help="the only folder this worker writes to (default: none, no checkpoints)",
    )
    add("--device", default="cpu", help="cpu or cuda:i")
    add("--threads", type=int, default=1, help="torch intra-op threads")
    add("--parent-pid", type=int, default=None, help="exit when this process is no longer the parent")
    for field, value in limits.items():
        flag = "--" + field.replace("_", "-")
        add(
            flag,
            type=type(value),
            default=value,
            help=f"own limit, whatever the coordinator asks (default {value:g})",
        )
    add("--log-level", default="INFO")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run a worker until SHUTDOWN, Ctrl-C, or its parent's death; then exit at once with status 0."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keygen"]:
        if len(argv) != 2:
            sys.exit("usage: python -m experts.worker keygen PATH")
        try:
            print(keygen(argv[1]))
        except PoimoeError as err:
            sys.exit(str(err))
        return
    args = parse_args(argv)
    name = args.name or f"{socket.gethostname()}-{os.getpid()}"
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s worker[{name}] %(levelname)s %(message)s")
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints where a stuck worker is
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))
    limits = WorkerLimits(
        **{field.name: getattr(args, field.name) for field in dataclasses.fields(WorkerLimits)}
    )
    try:
        key = load_or_create(args.key) if args.key else None
        coordinator_key = read_hotkey(args.coordinator_key) if args.coordinator_key else None
        worker = Worker(
            args.coordinator, name=name, device=args.device, threads=args.threads, parent_pid=args.parent_pid,
            state_dir=args.state_dir, limits=limits, key=key, coordinator_key=coordinator_key,
        )  # fmt: skip
    except PoimoeError as err:
        sys.exit(f"worker {name}: {err}")
    if key is not None:
        log.info("worker %s has hotkey %s", name, key.hotkey)
    try:
        worker.run()
    except KeyboardInterrupt:
        log.info("interrupted")
    logging.shutdown()
    os._exit(0)  # nothing is left to flush; skipping torch's interpreter teardown saves a second


if __name__ == "__main__":
    main()
