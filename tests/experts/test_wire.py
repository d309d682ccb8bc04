"""The wire: every dtype round-trips bit-exactly, every malformed frame is rejected with WireError."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from experts.remote import ProcessTransportConfig, wire
from experts.remote.settings import WorkerSettings, settings_meta, typed_meta
from experts.remote.wire import HEADER, MAX_NDIM, Kind, Message, WireLimits, decode, encode
from moe.errors import WireError

pytestmark = pytest.mark.timeout(60)


def sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Random bits of `dtype`, including NaN and inf patterns for the float types."""
    numel = 1
    for dim in shape:
        numel *= dim
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(
            a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
        )
    )


def frames_of(message: Message) -> list[bytes]:
    return [bytes(frame) for frame in encode(message)]


def repack(header: bytes, **changes) -> bytes:
    """`header` with fields changed and both its checksums still valid where not asked otherwise."""
    names = [
        "magic",
        "version",
        "kind",
        "dtype",
        "ndim",
        "checksum_kind",
        "step",
        "layer",
        "expert",
        "payload_len",
        "checksum",
        *[f"dim{i}" for i in range(MAX_NDIM)],
        "header_crc",
    ]
    fields = dict(zip(names, HEADER.unpack(header), strict=True))
    fields.update(changes)
    packed = HEADER.pack(*[fields[n] for n in names])
    if "header_crc" in changes:
        return packed
    return packed[:-4] + struct.pack("<I", zlib.crc32(packed[:-4]))


@pytest.mark.parametrize("dtype", list(wire.DTYPE_CODES), ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 5), (1, 2, 1, 2, 1, 3)], ids=str)
def test_every_dtype_and_shape_round_trips_bit_exactly(dtype, shape):
    tensor = sample(dtype, shape)
    message = Message(Kind.OUTPUT, step=7, layer=2, expert=5, meta={"k": [1, "x"]}, tensors=[tensor])
    back = decode(encode(message))
    assert (back.kind, back.step, back.layer, back.expert, back.meta) == (
        Kind.OUTPUT,
        7,
        2,
        5,
        {"k": [1, "x"]},
    )
    assert same_bits(back.tensors[0], tensor)


def test_non_contiguous_and_several_tensors_round_trip():
    base = torch.randn(4, 6)
    tensors = [base.t(), base[:, ::2], torch.arange(5), torch.tensor(True)]
    back = decode(encode(Message(Kind.ECHO, tensors=tensors)))
    assert all(torch.equal(a, b) for a, b in zip(back.tensors, tensors, strict=True))


def test_optimizer_state_and_parameters_cross_as_named_tensors():
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, betas=(0.8, 0.9))
    module(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    message = wire.expert_state_message(Kind.STATE, module.state_dict(), optimizer.state_dict(), expert=1)
    params, optimizer_state = wire.expert_state_from(decode(encode(message)))
    clone = torch.nn.Linear(3, 2)
    clone.load_state_dict(params)
    clone_optimizer = torch.optim.AdamW(clone.parameters(), lr=1.0)
    clone_optimizer.load_state_dict(optimizer_state)
    assert clone_optimizer.param_groups[0]["betas"] == (0.8, 0.9)
    assert clone_optimizer.param_groups[0]["lr"] == 1e-2
    for a, b in zip(module.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)
        assert torch.equal(optimizer.state[a]["exp_avg_sq"], clone_optimizer.state[b]["exp_avg_sq"])


def _malformed_cases() -> dict[str, list]:
    good = frames_of(Message(Kind.FORWARD, step=1, layer=0, expert=3, tensors=[torch.randn(4, 8)]))
    head, meta, t_head, t_payload = good
    other = frames_of(Message(Kind.FORWARD, step=2, layer=0, expert=3, tensors=[torch.randn(4, 8)]))
    return {
        "no frames": [],
        "odd frame count": [head, meta, t_head],
        "short header": [head[:-1], meta],
        "bad magic": [b"XXXX" + head[4:], meta],
        "garbled header": [head[:20] + bytes([head[20] ^ 0xFF]) + head[21:], meta],
        "future version": [repack(head, version=99), meta],
        "unknown kind": [repack(head, kind=200), meta],
        "unknown dtype": [head, meta, repack(t_head, dtype=250), t_payload],
        "too many dims": [head, meta, repack(t_head, ndim=MAX_NDIM + 1), t_payload],
        "truncated payload": [head, meta, t_head, t_payload[:-4]],
        "garbled payload": [head, meta, t_head, t_payload[:-1] + bytes([t_payload[-1] ^ 1])],
        "shape disagrees with bytes": [head, meta, repack(t_head, dim0=5), t_payload],
        "unknown checksum": [head, meta, repack(t_head, checksum_kind=9), t_payload],
        "meta not json": [repack(head, payload_len=3, checksum=zlib.crc32(b"{x}"), checksum_kind=1), b"{x}"],
        "meta not an object": [
            repack(head, payload_len=2, checksum=zlib.crc32(b"[]"), checksum_kind=1),
            b"[]",
        ],
        "tensor from another message": [head, meta, other[2], other[3]],
        "json where a tensor belongs": [head, meta, head, meta],
        "first pair is a tensor": [t_head, t_payload],
    }


@pytest.mark.parametrize("case", list(_malformed_cases()))
def test_malformed_frames_are_rejected_with_wire_error(case):
    with pytest.raises(WireError):
        decode(_malformed_cases()[case])


def test_limits_reject_oversized_payloads_and_too_many_tensors():
    big = encode(Message(Kind.OUTPUT, tensors=[torch.zeros(1024)]))
    with pytest.raises(WireError, match="exceeds"):
        decode(big, WireLimits(max_tensor_bytes=1000))
    many = encode(Message(Kind.OUTPUT, tensors=[torch.zeros(1)] * 5))
    with pytest.raises(WireError, match="tensors exceed"):
        decode(many, WireLimits(max_tensors=4))
    with pytest.raises(WireError, match="exceeds"):
        decode(encode(Message(Kind.HELLO, meta={"x": "y" * 100})), WireLimits(max_meta_bytes=50))


def test_named_tensors_need_matching_names():
    message = decode(
        encode(Message(Kind.STATE, meta={"names": ["a"]}, tensors=[torch.ones(1), torch.ones(2)]))
    )
    with pytest.raises(WireError):
        message.named()
    with pytest.raises(WireError):
        wire.optimizer_state_from_named({"bogus": torch.ones(1)}, [])


def test_the_crc32_fallback_is_accepted():
    payload = json.dumps({"a": 1}).encode()
    head = frames_of(Message(Kind.HEARTBEAT, meta={"a": 1}))[0]
    head = repack(head, checksum_kind=wire.CRC32, checksum=zlib.crc32(payload), payload_len=len(payload))
    assert decode([head, payload]).meta == {"a": 1}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    edits=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    cut=st.one_of(st.none(), st.tuples(st.integers(0, 3), st.integers(0, 10_000))),
    drop=st.one_of(st.none(), st.integers(0, 3)),
)
def test_fuzzed_frames_decode_or_raise_wire_error_only(data, edits, cut, drop):
    tensor = data.draw(
        st.sampled_from([torch.randn(3, 4), torch.arange(6, dtype=torch.int16), torch.ones(0)])
    )
    frames = [bytearray(f) for f in frames_of(Message(Kind.OUTPUT, step=4, expert=1, tensors=[tensor]))]
    for index, position, value in edits:
        if frames[index]:
            frames[index][position % len(frames[index])] = value
    if cut is not None:
        frames[cut[0]] = frames[cut[0]][: cut[1] % (len(frames[cut[0]]) + 1)]
    if drop is not None:
        del frames[drop]
    try:
        message = decode([bytes(f) for f in frames])
    except WireError:
        return
    assert message.kind in Kind  # whatever got through is a well-formed message


def test_welcome_carries_the_worker_settings_of_the_transport_config_and_nothing_else():
    cfg = ProcessTransportConfig(cache_size=3, max_grad_norm=0.0, k_min=2)
    meta = settings_meta(WorkerSettings, cfg)
    assert meta == {"max_grad_norm": 0.0, "heartbeat_interval": 1.0, "cache_size": 3}
    assert typed_meta(WorkerSettings, meta, "welcome").cache_size == 3
