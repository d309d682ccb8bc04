"""A worker's own checkpoint: its experts' STATE messages in one safetensors file.

Each message's named tensors are stored as `<index>/<name>`; everything else (kind, step, layer,
expert, meta: layer name, spec, steps, optimizer param groups) goes into the safetensors metadata
as JSON, with a checksum per tensor, since safetensors itself would load flipped bytes silently.
A missing, truncated or corrupt file raises `CheckpointError` naming its path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from experts.errors import CheckpointError, WireError
from experts.remote.wire import DEFAULT_CHECKSUM, Kind, Message, checksum, tensor_bytes

FORMAT = "poimoe-worker-checkpoint/1"
CHECKPOINT_FILE = "experts.safetensors"  # in the worker's own state dir


def save_messages(path: Path, messages: list[Message]) -> None:
    """Write named-tensor messages to `path` atomically (a temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, headers = {}, []
    for index, message in enumerate(messages):
        for name, tensor in message.named().items():
            tensors[f"{index}/{name}"] = tensor.detach().cpu().contiguous()
        headers.append({"kind": int(message.kind), "step": message.step, "layer": message.layer,
                        "expert": message.expert, "meta": message.meta})  # fmt: skip
    checksums = {name: checksum(tensor_bytes(t), DEFAULT_CHECKSUM) for name, t in tensors.items()}
    metadata = {
        "format": FORMAT,
        "messages": json.dumps(headers),
        "checksum_kind": str(DEFAULT_CHECKSUM),
        "checksums": json.dumps(checksums),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, tmp, metadata=metadata)
    with open(tmp, "rb") as written:
        os.fsync(written.fileno())
    os.replace(tmp, path)


def load_messages(path: Path) -> list[Message]:
    """Read a file written by `save_messages`; raises CheckpointError naming the path if it is unreadable."""
    path = Path(path)
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (not a dict)
        return _messages_from(tensors, metadata)
    except (OSError, SafetensorError, WireError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"worker checkpoint {path} is unreadable: {err}") from None


def _messages_from(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> list[Message]:
    if metadata.get("format") != FORMAT:
        raise WireError(f"not a poimoe worker checkpoint (format {metadata.get('format')!r})")
    kind, expected = int(metadata["checksum_kind"]), json.loads(metadata["checksums"])
    if set(expected) != set(tensors):
        raise WireError("the tensors do not match the checksum list")
    for name, tensor in tensors.items():
        if checksum(tensor_bytes(tensor), kind) != expected[name]:
            raise WireError(f"checksum mismatch in tensor {name!r} (corrupt file)")
    messages = []
    for index, header in enumerate(json.loads(metadata["messages"])):
        meta = header["meta"]
        named = [tensors[f"{index}/{name}"] for name in meta.get("names", [])]
        messages.append(
            Message(Kind(header["kind"]), header["step"], header["layer"], header["expert"], meta, named)
        )
    return messages
