"""Message framing between the trainer and its workers: fixed headers and raw tensor bytes, no pickle.

A message is a list of ZeroMQ frames made of (header, payload) pairs. The first pair carries the
message itself: its header names the kind, step, layer and expert, and its payload is a small UTF-8
JSON object (`meta`; JSON is data, never code). Every further pair is one tensor: a header with its
dtype, shape and byte length, then its raw bytes. Every header carries a checksum of itself and of
its payload, so a truncated, garbled, oversized or unknown frame raises `WireError` when decoded and
is counted by the receiver, which then carries on: nothing received from a peer is ever unpickled.
`decode` raises nothing but `WireError`, whatever the bytes: it bounds the frame count, the bytes of
each frame and of the whole message, every tensor dimension (≤ 2³¹) and the JSON meta's nesting and
integer size before anything is allocated. (Meta becomes a dataclass through `settings.typed_meta`.)

Parameters and optimizer state cross the wire as named tensors: their names are listed in
`meta["names"]`, their non-tensor parts (param groups) as JSON. Workers write the same named tensors
to their checkpoint files (`experts.remote.checkpoint`, safetensors).

Legend: none: tensors here have any shape.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple

import torch

from experts.errors import WireError

try:  # xxh3 checksums ~50 GB/s, crc32 ~4 GB/s; receivers accept both, the header says which
    import xxhash
except ImportError:  # pragma: no cover - xxhash comes with `datasets`
    xxhash = None

MAGIC = b"PMOE"
VERSION = 1
MAX_NDIM = 6
MAX_DIM = 2**31  # the largest tensor dimension the wire carries
MAX_INT_DIGITS = 20  # JSON integers in meta: up to 20 digits (every int64 fits); longer ones are refused
RECEIVE_HWM = 1000  # messages a socket queues per peer before ZeroMQ stops reading from that peer

# magic, version, kind, dtype, ndim, checksum kind, step, layer, expert, payload bytes, payload checksum,
# shape (MAX_NDIM dims, unused ones zero), then the crc32 of all the bytes before it.
HEADER = struct.Struct(f"<4sBBBBB3xQIIQQ{MAX_NDIM}QI")
_HEADER_BODY = struct.Struct(HEADER.format[:-1])  # all but the trailing crc32, which covers it
_HEADER_CRC = struct.Struct("<I")
_NO_DIMS = (0,) * MAX_NDIM


class Kind(IntEnum):
    """Message kinds; `→w` is trainer to worker, `→c` worker to coordinator (the trainer)."""

    HELLO = 1  # →c: a worker registers: meta {name, pid, device, threads}
    WELCOME = 2  # →w: registration accepted: meta `WorkerSettings` {heartbeat_interval, cache_size, ...}
    HOST = 3  # →w: host (layer, expert): meta {spec, optim, compute, link, restore}, tensors = parameters
    HOSTED = 4  # →c: hosted: meta {restored}
    FORWARD = 5  # →w: tensors [x_aD] for one expert, one call; meta {keep, grad_input, autocast}
    OUTPUT = 6  # →c: tensors [y_aD]; meta {version} of the parameters that answered
    BACKWARD = 7  # →w: tensors [grad_y_aD] for the call named by `step`; meta {input_only} (optional)
    GRAD_INPUT = 8  # →c: tensors [grad_x_aD] (none when the trainer asked for no input gradient)
    STEP = 9  # →w: clip, step and zero this expert's optimizer
    STEPPED = (
        10  # →c: meta {skipped: reason or null, grad_norm, version, commitment (parameter sketch or null)}
    )
    GET_STATE = 11  # →w: send this expert's parameters and optimizer state
    STATE = 12  # →c: named tensors + meta {param_groups}
    LOAD_STATE = 13  # →w: replace parameters and optimizer state (named tensors + meta)
    LOADED = 14  # →c
    CHECKPOINT = 15  # →w: write all hosted experts to the worker's own checkpoint (in its state dir)
    CHECKPOINTED = 16  # →c: meta {path}
    HEARTBEAT = 17  # →c: meta {rejected, errors}
    ECHO = 18  # →w: send the tensors straight back (benchmarks, health checks)
    ECHOED = 19  # →c
    TRAIN_MODE = 20  # →w: meta {mode}
    SHUTDOWN = 21  # →w: exit now
    REGISTER_AGAIN = 22  # →w: the coordinator does not know this peer (it restarted): send HELLO
    ERROR = 23  # either way: meta {reason, request}; the request named by (step, layer, expert) failed
    KEEP_STATES = 24  # →w: meta {window}: commit after every step, keep the last `window` versions
    AUDIT = 25  # →w: meta {version}: this expert's state at that version (ERROR when not kept)
    AUDIT_STATE = (
        26  # →c: named tensors (parameters, optimizer state) + meta {version, next_version, next_sketch}
    )


DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float64: 2,
    torch.float16: 3,
    torch.bfloat16: 4,
    torch.int64: 5,
    torch.int32: 6,
    torch.int16: 7,
    torch.int8: 8,
    torch.uint8: 9,
    torch.bool: 10,
    torch.complex64: 11,
    torch.complex128: 12,
    torch.float8_e4m3fn: 13,
    torch.float8_e5m2: 14,
    torch.uint16: 15,
    torch.uint32: 16,
    torch.uint64: 17,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
JSON_CODE = 0  # the payload is UTF-8 JSON, not a tensor

CRC32, XXH3 = 1, 2
_JSON = json.JSONEncoder(separators=(",", ":"))  # what json.dumps builds anew for every call


@dataclass(frozen=True)
class WireLimits:
    """What a receiver accepts; anything beyond is rejected before it is interpreted."""

    max_tensor_bytes: int = 1 << 30  # one tensor frame
    max_meta_bytes: int = 1 << 20  # the JSON meta frame
    max_tensors: int = 4096  # tensors per message (frames: twice this, plus the meta pair)
    max_message_bytes: int = 1 << 32  # all frames of one message together
    max_json_depth: int = 32  # nesting of lists and objects in the meta

    @classmethod
    def from_mb(cls, frame_mb: float, message_mb: float) -> WireLimits:
        """Limits from the megabyte settings of the transport config and the worker's command line."""
        return cls(max_tensor_bytes=int(frame_mb * 2**20), max_message_bytes=int(message_mb * 2**20))

    @property
    def max_frame_bytes(self) -> int:
        """The socket's per-frame cap (ZMQ_MAXMSGSIZE): the larger of a tensor and a meta frame."""
        return max(self.max_tensor_bytes, self.max_meta_bytes, HEADER.size)


@dataclass
class Message:
    kind: Kind
    step: int = 0
    layer: int = 0
    expert: int = 0
    meta: dict = field(default_factory=dict)
    tensors: list[torch.Tensor] = field(default_factory=list)

    def named(self) -> dict[str, torch.Tensor]:
        """The tensors by the names listed in `meta["names"]`."""
        names = self.meta.get("names", [])
        if not isinstance(names, list) or len(names) != len(self.tensors):
            raise WireError(f"{len(self.tensors)} tensors but meta names {names!r:.80}")
        return dict(zip(names, self.tensors, strict=True))


def named_message(kind: Kind, tensors: dict[str, torch.Tensor], **fields) -> Message:
    """A message carrying `tensors` by name (parameters, optimizer state)."""
    meta = {**fields.pop("meta", {}), "names": list(tensors)}
    return Message(kind, meta=meta, tensors=list(tensors.values()), **fields)


def checksum(data, kind: int) -> int:
    if kind == XXH3:
        if xxhash is None:
            raise WireError("frame uses an xxh3 checksum but xxhash is not installed here")
        return xxhash.xxh3_64_intdigest(data)
    if kind == CRC32:
        return zlib.crc32(data)
    raise WireError(f"unknown checksum kind {kind}")


DEFAULT_CHECKSUM = XXH3 if xxhash is not None else CRC32
_default_checksum = xxhash.xxh3_64_intdigest if xxhash is not None else zlib.crc32


def _pack_header(message: Message, dtype_code: int, shape: tuple[int, ...], payload) -> bytes:
    ndim = len(shape)
    if ndim > MAX_NDIM:
        raise WireError(f"tensor of {ndim} dims; the wire carries at most {MAX_NDIM}")
    body = _HEADER_BODY.pack(
        MAGIC, VERSION, message.kind, dtype_code, ndim, DEFAULT_CHECKSUM,
        message.step, message.layer, message.expert, len(payload), _default_checksum(payload),
        *shape, *_NO_DIMS[ndim:],
    )  # fmt: skip
    return body + _HEADER_CRC.pack(zlib.crc32(body))


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw bytes in C order, without a copy when it is already contiguous on the CPU."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.is_conj() or tensor.is_neg():
        tensor = tensor.resolve_conj().resolve_neg().cpu().contiguous()
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())


def host_copies(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors, detached, on the host for the wire. CPU tensors are returned as they are; from a GPU
    all are copied in one go (non-blocking, into pinned memory) and waited for once, instead of one
    blocking copy (one host synchronisation) each."""
    if all(t.device.type == "cpu" for t in tensors):
        return [t.detach() for t in tensors]
    if tensors[0].device.type != "cuda":
        return [t.detach().cpu() for t in tensors]
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for host_t, t in zip(host, tensors, strict=True):
        host_t.copy_(t.detach(), non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return host


def encode(message: Message) -> list:
    """The frames of `message`: (header, payload) pairs; payloads are zero-copy views of tensors."""
    meta = _JSON.encode(message.meta).encode()
    frames = [_pack_header(message, JSON_CODE, (), meta), meta]
    for tensor in message.tensors:
        code = DTYPE_CODES.get(tensor.dtype)
        if code is None:
            raise WireError(f"dtype {tensor.dtype} cannot cross the wire")
        payload = tensor_bytes(tensor)
        frames += (_pack_header(message, code, tensor.shape, payload), payload)
    return frames


class FrameHeader(NamedTuple):
    kind: int
    dtype_code: int
    shape: tuple[int, ...]
    step: int
    layer: int
    expert: int
    payload_len: int
    checksum_kind: int
    checksum: int


def _buffer(part) -> memoryview:
    """A zmq.Frame, bytes or memoryview as a flat byte view."""
    buf = part.buffer if hasattr(part, "buffer") else part
    return memoryview(buf).cast("B")


def unpack_header(part) -> FrameHeader:
    """The fields of a header frame, or WireError; every dimension it declares is at most `MAX_DIM`."""
    return _unpack_header(_buffer(part))


def _unpack_header(raw: memoryview) -> FrameHeader:
    if len(raw) != HEADER.size:
        raise WireError(f"header of {len(raw)} bytes, expected {HEADER.size}")
    (
        magic,
        version,
        kind,
        dtype_code,
        ndim,
        checksum_kind,
        step,
        layer,
        expert,
        payload_len,
        payload_sum,
        *rest,
    ) = HEADER.unpack(raw)
    dims, header_crc = rest[:MAX_NDIM], rest[MAX_NDIM]
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}")
    if zlib.crc32(raw[:-4]) != header_crc:
        raise WireError("header checksum mismatch (garbled header)")
    if version != VERSION:
        raise WireError(f"wire version {version}, this side speaks {VERSION}")
    if kind not in Kind._value2member_map_:
        raise WireError(f"unknown message kind {kind}")
    if dtype_code != JSON_CODE and dtype_code not in CODE_DTYPES:
        raise WireError(f"unknown dtype code {dtype_code}")
    if ndim > MAX_NDIM:
        raise WireError(f"ndim {ndim} > {MAX_NDIM}")
    if max(dims) > MAX_DIM:
        raise WireError(f"dimension {max(dims)} exceeds the limit of {MAX_DIM}")
    return FrameHeader(
        kind, dtype_code, tuple(dims[:ndim]), step, layer, expert, payload_len, checksum_kind, payload_sum
    )


def _check_payload(header: FrameHeader, payload: memoryview, limit: int) -> None:
    if header.payload_len > limit:
        raise WireError(f"payload of {header.payload_len} bytes exceeds the limit of {limit}")
    if len(payload) != header.payload_len:
        raise WireError(f"payload of {len(payload)} bytes, header says {header.payload_len} (truncated?)")
    if checksum(payload, header.checksum_kind) != header.checksum:
        raise WireError("payload checksum mismatch (garbled payload)")


def _tensor_from(header: FrameHeader, payload: memoryview, limits: WireLimits) -> torch.Tensor:
    """The tensor a checked payload holds: a view of the received bytes (no copy) when they are writable
    and aligned for its dtype, as zmq's receive buffers are."""
    dtype = CODE_DTYPES[header.dtype_code]
    itemsize = dtype.itemsize
    numel, span = 1, itemsize
    for dim in header.shape:
        numel *= dim
        span *= max(dim, 1)  # an empty tensor's other dimensions still size its strides
    if span > limits.max_tensor_bytes:
        raise WireError(f"shape {header.shape} spans more than {limits.max_tensor_bytes} bytes")
    if numel * itemsize != header.payload_len:
        raise WireError(
            f"shape {header.shape} of {dtype} needs {numel * itemsize} bytes, got {header.payload_len}"
        )
    if numel == 0:
        return torch.empty(header.shape, dtype=dtype)
    if payload.readonly:
        payload = memoryview(bytearray(payload))
    flat = torch.frombuffer(payload, dtype=torch.uint8)
    if flat.data_ptr() % itemsize:  # zmq may hand out unaligned views into its receive buffer
        flat = flat.clone()
    return flat.view(dtype).view(header.shape)


def decode(parts: list, limits: WireLimits = WireLimits()) -> Message:
    """Parse frames into a `Message`, or raise `WireError` saying what was wrong with them."""
    if len(parts) < 2 or len(parts) % 2:
        raise WireError(f"{len(parts)} frames; a message is (header, payload) pairs")
    if len(parts) // 2 - 1 > limits.max_tensors:
        raise WireError(f"{len(parts) // 2 - 1} tensors exceed the limit of {limits.max_tensors}")
    buffers = [_buffer(part) for part in parts]
    total = sum(map(len, buffers))
    if total > limits.max_message_bytes:
        raise WireError(f"message of {total} bytes exceeds the limit of {limits.max_message_bytes}")
    head = _unpack_header(buffers[0])
    if head.dtype_code != JSON_CODE:
        raise WireError("the first frame pair must carry JSON meta")
    _check_payload(head, buffers[1], limits.max_meta_bytes)
    message = Message(Kind(head.kind), head.step, head.layer, head.expert, parse_meta(buffers[1], limits))
    address = head[:1] + head[3:6]  # kind, step, layer, expert
    for raw_header, payload in zip(buffers[2::2], buffers[3::2], strict=True):
        header = _unpack_header(raw_header)
        if header[:1] + header[3:6] != address:
            raise WireError("tensor frame belongs to a different message")
        if header.dtype_code == JSON_CODE:
            raise WireError("a tensor frame pair carries JSON")
        _check_payload(header, payload, limits.max_tensor_bytes)
        message.tensors.append(_tensor_from(header, payload, limits))
    return message


def parse_meta(raw: memoryview | bytes, limits: WireLimits = WireLimits()) -> dict:
    """A JSON object with integers of at most `MAX_INT_DIGITS` digits and at most `max_json_depth`
    levels of nesting, or WireError."""
    try:
        meta = _JSON_DECODER.decode(str(raw, "utf-8"))
    except RecursionError:
        raise WireError(f"meta nests deeper than {limits.max_json_depth} levels") from None
    except ValueError as err:  # not UTF-8 (UnicodeDecodeError), not JSON
        raise WireError(f"meta is not JSON: {str(err)[:200]}") from None
    if not isinstance(meta, dict):
        raise WireError("meta must be a JSON object")
    _check_depth(meta, limits.max_json_depth)
    return meta


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise WireError(
            f"meta holds an integer of {len(digits)} digits; at most {MAX_INT_DIGITS} are accepted"
        )
    return int(digits)


_JSON_DECODER = json.JSONDecoder(parse_int=_bounded_int)  # what json.loads builds anew for every call


def _check_depth(meta: dict, max_depth: int) -> None:
    pending = [(meta, 1)]
    while pending:
        node, depth = pending.pop()
        if depth > max_depth:
            raise WireError(f"meta nests deeper than {max_depth} levels")
        children = node.values() if isinstance(node, dict) else node
        pending += [(child, depth + 1) for child in children if isinstance(child, (dict, list))]


# --- parameters and optimizer state as named tensors -------------------------------------------------


def optimizer_state_to_named(state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split `optimizer.state_dict()` into named tensors (`state.<param>.<key>`) and JSON param groups."""
    tensors = {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            tensors[f"state.{param_id}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
        for group in state["param_groups"]
    ]
    return tensors, groups


def optimizer_state_from_named(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    """Inverse of `optimizer_state_to_named`; raises WireError on names it does not understand."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        prefix, param_id, key = (name.split(".", 2) + ["", ""])[:3]
        if prefix != "state" or not param_id.isdigit() or not key:
            raise WireError(f"unexpected optimizer tensor name {name!r}")
        state.setdefault(int(param_id), {})[key] = value
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise WireError("optimizer param_groups must be a list of objects")
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}


def expert_state_message(kind: Kind, params: dict, optim_state: dict, **fields) -> Message:
    """Parameters (`param.<name>`) and optimizer state (`optim.<...>`) of one expert in one message."""
    optim_tensors, groups = optimizer_state_to_named(optim_state)
    tensors = {f"param.{k}": v for k, v in params.items()} | {
        f"optim.{k}": v for k, v in optim_tensors.items()
    }
    meta = {**fields.pop("meta", {}), "param_groups": groups}
    return named_message(kind, tensors, meta=meta, **fields)


def expert_state_from(message: Message) -> tuple[dict[str, torch.Tensor], dict]:
    """(parameters, optimizer state dict) from a message made by `expert_state_message`."""
    params, optim = {}, {}
    for name, tensor in message.named().items():
        if name.startswith("param."):
            params[name[len("param.") :]] = tensor
        elif name.startswith("optim."):
            optim[name[len("optim.") :]] = tensor
        else:
            raise WireError(f"unexpected state tensor name {name!r}")
    return params, optimizer_state_from_named(optim, message.meta.get("param_groups", []))
