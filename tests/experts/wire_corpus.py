"""Hostile frames for the wire: valid messages mutated, and frames that pass every checksum but carry
what an attacker would send (dimensions ≥ 2³¹, deep JSON, huge integers, too many or too large frames).

`hostile_message(rng)` draws one message (a list of frames) from a `random.Random`, so the fuzz tests
(hypothesis hands them the generator) and the tests that fire a corpus at live processes share it.
"""

from __future__ import annotations

import random
import struct
import zlib

import torch

from experts.remote.wire import (
    CRC32,
    DTYPE_CODES,
    HEADER,
    JSON_CODE,
    MAGIC,
    MAX_NDIM,
    VERSION,
    Kind,
    Message,
    encode,
)

# small limits, so that "too many" and "too large" are reached by frames the fuzzer can afford
FUZZ_LIMITS = {
    "max_tensor_bytes": 1 << 14,
    "max_meta_bytes": 1 << 14,
    "max_tensors": 8,
    "max_message_bytes": 1 << 16,
}
KINDS = [kind for kind in Kind if kind != Kind.SHUTDOWN]  # a well-formed SHUTDOWN is obeyed, by design
BIG_DIMS = [2**31 - 1, 2**31, 2**31 + 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def header(kind: int = Kind.OUTPUT, dtype: int = JSON_CODE, dims: list[int] = (), ndim: int | None = None,
           payload: bytes = b"", payload_len: int | None = None, address: tuple[int, int, int] = (1, 0, 0)) -> bytes:  # fmt: skip
    """A header frame with both checksums valid, whatever its fields say."""
    ndim = len(dims) if ndim is None else ndim
    dims = (list(dims) + [0] * MAX_NDIM)[:MAX_NDIM]
    size = len(payload) if payload_len is None else payload_len
    packed = HEADER.pack(
        MAGIC, VERSION, int(kind), dtype, ndim, CRC32, *address, size, zlib.crc32(payload), *dims, 0
    )
    return packed[:-4] + struct.pack("<I", zlib.crc32(packed[:-4]))


def meta_pair(payload: bytes, kind: int = Kind.OUTPUT) -> list[bytes]:
    return [header(kind, JSON_CODE, payload=payload), payload]


def nested_json(depth: int, rng: random.Random) -> bytes:
    opening, closing = rng.choice([("[", "]"), ('{"a":', "}")])
    return ('{"x":' + opening * depth + "1" + closing * depth + "}").encode()


def random_meta(rng: random.Random, depth: int = 0) -> object:
    choice = rng.randrange(7 if depth < 3 else 4)
    if choice == 0:
        return rng.randint(-(2**63), 2**63)
    if choice == 1:
        return rng.choice([0.5, -1e308, float("nan"), float("inf")])
    if choice == 2:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(8)))
    if choice == 3:
        return rng.choice([None, True, False])
    if choice == 4:
        return [random_meta(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(rng.randrange(100)): random_meta(rng, depth + 1) for _ in range(rng.randrange(4))}


def valid_message(rng: random.Random) -> list[bytes]:
    tensors = []
    for _ in range(rng.randrange(3)):
        dtype = rng.choice(list(DTYPE_CODES))
        shape = tuple(rng.randrange(4) for _ in range(rng.randrange(4)))
        tensors.append(torch.zeros(shape, dtype=dtype))
    meta = {"m": random_meta(rng)}
    address = (rng.randrange(2**16), rng.randrange(8), rng.randrange(64))
    message = Message(rng.choice(KINDS), *address, meta=meta, tensors=tensors)
    return [bytes(frame) for frame in encode(message)]


def mutated(rng: random.Random) -> list[bytes]:
    frames = [bytearray(f) for f in valid_message(rng)]
    for _ in range(rng.randrange(1, 4)):
        index = rng.randrange(len(frames))
        action = rng.randrange(5)
        if action == 0 and frames[index]:
            frames[index][rng.randrange(len(frames[index]))] = rng.randrange(256)
        elif action == 1:
            frames[index] = frames[index][: rng.randrange(len(frames[index]) + 1)]
        elif action == 2 and len(frames) > 1:
            del frames[index]
        elif action == 3:
            frames.insert(index, bytearray(rng.randbytes(rng.randrange(HEADER.size + 2))))
        else:
            frames.insert(index, frames[index][:])
    return [bytes(f) for f in frames]


def hostile_header(rng: random.Random) -> list[bytes]:
    """A well-formed meta pair, then a tensor header whose checksums pass and whose fields lie."""
    dims = [
        rng.choice([*BIG_DIMS, 0, 1, 3, rng.randrange(2**64)]) for _ in range(rng.randrange(MAX_NDIM + 1))
    ]
    if dims and rng.random() < 0.3:
        dims[rng.randrange(len(dims))] = 0  # an empty tensor with huge other dimensions
    payload = rng.randbytes(rng.randrange(16))
    tensor_header = header(
        dtype=rng.choice([*DTYPE_CODES.values(), JSON_CODE, rng.randrange(256)]),
        dims=dims,
        ndim=rng.choice([None, None, rng.randrange(256)]),
        payload=payload,
        payload_len=rng.choice([None, None, rng.randrange(2**64)]),
    )
    return [*meta_pair(b"{}"), tensor_header, payload]


def hostile_meta(rng: random.Random) -> list[bytes]:
    """A meta frame whose checksum passes and whose JSON would hurt a naive parser."""
    kind = rng.choice([0, 1, 2, 3, 4, 5, 6, 7])
    if kind == 0:
        payload = nested_json(rng.choice([33, 100, 1000, 5000, 100_000]), rng)
    elif kind == 1:
        payload = b'{"n":' + b"9" * rng.choice([21, 400, 5000, 10_000]) + b"}"
    elif kind == 2:
        payload = rng.choice([b'{"x":1e999}', b'{"x":NaN}', b'{"x":-Infinity}', b'{"x":"\\ud800"}'])
    elif kind == 3:
        payload = rng.randbytes(rng.randrange(64))
    elif kind == 4:
        payload = rng.choice([b"[]", b"1", b'"s"', b"null", b"", b'{"a":1,"a":2}', b"\xef\xbb\xbf{}"])
    elif kind == 5:
        payload = b'{"name":"' + rng.choice([b"../../etc", b"a" * 200, b"w0", b"\\u0000"]) + b'"}'
    elif kind == 6:
        payload = ('{"s":"' + "x" * rng.choice([100, 1 << 15]) + '"}').encode()
    else:
        payload = ('{"l":[' + ",".join(["1"] * rng.choice([10, 10_000])) + "]}").encode()
    return meta_pair(payload, kind=rng.choice(KINDS))


def too_many(rng: random.Random) -> list[bytes]:
    """More tensors, or more bytes in all, than `FUZZ_LIMITS` allow, each frame small enough alone."""
    many = rng.random() < 0.5
    count, size = (rng.choice([9, 40, 500]), 4) if many else (8, 12 * 1024)  # 8 × 12 KB: 96 KB in all
    head, meta, tensor_head, payload = (
        bytes(f) for f in encode(Message(Kind.OUTPUT, tensors=[torch.zeros(size // 4)]))
    )
    return [head, meta, *[tensor_head, payload] * count]


def raw(rng: random.Random) -> list[bytes]:
    return [rng.randbytes(rng.randrange(80)) for _ in range(rng.randrange(7))]


MAKERS = (mutated, hostile_header, hostile_meta, too_many, raw)


def hostile_message(rng: random.Random) -> list[bytes]:
    return rng.choice(MAKERS)(rng)


def corpus(count: int, seed: int = 0) -> list[list[bytes]]:
    rng = random.Random(seed)
    return [hostile_message(rng) for _ in range(count)]
