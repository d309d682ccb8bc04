"""The wire cannot be crashed: each attack found on it, then a fuzz of random and structured frames.
`decode` must return a well-formed message or raise `WireError`, nothing else, for any input."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from experts.network import LinkSpec
from experts.owner import OptimizerSettings
from experts.remote.settings import WorkerSettings, typed_meta
from experts.remote.wire import Kind, Message, WireLimits, decode, encode
from moe.errors import WireError
from tests.experts.wire_corpus import FUZZ_LIMITS, header, hostile_message, meta_pair, nested_json

pytestmark = pytest.mark.timeout(120)


def test_deeply_nested_json_meta_is_a_wire_error_not_a_recursion_error():
    for depth in (33, 1000, 100_000):
        with pytest.raises(WireError, match="nests deeper"):
            decode(meta_pair(nested_json(depth, random.Random(depth))))
    assert decode(meta_pair(nested_json(30, random.Random(0)))).meta  # 31 levels: accepted


def test_integers_in_meta_are_bounded_to_twenty_digits():
    with pytest.raises(WireError, match="digits"):
        decode(meta_pair(b'{"n":' + b"9" * 5000 + b"}"))  # int() alone would raise ValueError
    assert decode(meta_pair(b'{"n":-9223372036854775808}')).meta == {"n": -(2**63)}


@pytest.mark.parametrize("dims", [(0, 2**63), (0, 2**31, 2**31, 2**31), (2**31 + 1,), (2**64 - 1, 0)])
def test_tensor_dimensions_past_two_to_the_31_are_refused_before_any_allocation(dims):
    frames = [*meta_pair(b"{}"), header(dtype=1, dims=list(dims)), b""]
    with pytest.raises(WireError, match="dimension|spans"):
        decode(frames)


def test_an_empty_tensor_whose_other_dimensions_span_too_much_is_refused():
    frames = [*meta_pair(b"{}"), header(dtype=1, dims=[0, 2**31, 2**31]), b""]
    with pytest.raises(WireError, match="spans"):
        decode(frames)  # torch.empty would fail computing its strides
    assert decode([*meta_pair(b"{}"), header(dtype=1, dims=[0, 512]), b""]).tensors[0].shape == (0, 512)


def test_the_size_limit_applies_to_the_whole_message_not_only_to_each_frame():
    tensors = [torch.zeros(1024)] * 8  # 4 KB each, 32 KB in all
    limits = WireLimits(max_tensor_bytes=8 * 1024, max_message_bytes=16 * 1024)
    with pytest.raises(WireError, match="message of .* exceeds"):
        decode(encode(Message(Kind.OUTPUT, tensors=tensors)), limits)
    assert len(decode(encode(Message(Kind.OUTPUT, tensors=tensors[:3])), limits).tensors) == 3


def test_typed_meta_checks_every_field_and_refuses_unknown_ones():
    assert typed_meta(WorkerSettings, {"cache_size": 3, "max_grad_norm": 1}, "welcome").cache_size == 3
    assert typed_meta(LinkSpec, {"distribution": "normal"}, "link").distribution == "normal"
    with pytest.raises(WireError, match=r"welcome\.checkpoint_dir: unknown field"):
        typed_meta(WorkerSettings, {"checkpoint_dir": "/elsewhere"}, "welcome")
    with pytest.raises(WireError, match=r"optim\.lr"):
        typed_meta(OptimizerSettings, {"lr": "${oc.env:HOME}"}, "optim")  # never resolved, refused
    with pytest.raises(WireError, match=r"welcome\.cache_size"):
        typed_meta(WorkerSettings, {"cache_size": True}, "welcome")
    with pytest.raises(WireError, match="JSON object"):
        typed_meta(WorkerSettings, [1], "welcome")


def decodes_or_raises_wire_error(frames: list[bytes], limits: WireLimits) -> None:
    try:
        message = decode(frames, limits)
    except WireError:
        return
    assert message.kind in Kind
    assert isinstance(message.meta, dict)
    assert all(t.numel() * t.element_size() <= limits.max_tensor_bytes for t in message.tensors)


LIMITS = [WireLimits(**FUZZ_LIMITS), WireLimits()]
SEEDS = st.integers(0, 2**64)  # a seed per message: hypothesis drawing every byte itself is 10× slower


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )


@fuzz(2000)
@given(seed=SEEDS, strict=st.booleans())
def test_structured_hostile_frames_decode_or_raise_wire_error_only(seed, strict):
    decodes_or_raises_wire_error(hostile_message(random.Random(seed)), LIMITS[strict])


@fuzz(1000)
@given(frames=st.lists(st.binary(max_size=160), max_size=8))
def test_random_frames_decode_or_raise_wire_error_only(frames):
    decodes_or_raises_wire_error(frames, LIMITS[0])


@pytest.mark.slow
@pytest.mark.timeout(1800)
@fuzz(100_000)
@given(seed=SEEDS, strict=st.booleans(), frames=st.lists(st.binary(max_size=160), max_size=8))
def test_a_hundred_thousand_hostile_and_random_messages_raise_only_wire_error(seed, strict, frames):
    decodes_or_raises_wire_error(hostile_message(random.Random(seed)), LIMITS[strict])
    decodes_or_raises_wire_error(frames, LIMITS[0])
