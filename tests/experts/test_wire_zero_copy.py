"""The wire's copy-free paths: a contiguous CPU tensor is framed as a view of its own memory, a received
payload is decoded as a view of the received buffer, both bit-exact through a real ZeroMQ socket pair;
the cheaper decoder still refuses what it refused before with `WireError`; host copies for the wire
and the worker's heap tuning."""

from __future__ import annotations

import platform

import pytest
import torch
import zmq

from experts.errors import WireError
from experts.heap import keep_freed_memory
from experts.remote.wire import (
    JSON_CODE,
    Kind,
    Message,
    _pack_header,
    decode,
    encode,
    host_copies,
    tensor_bytes,
)

pytestmark = pytest.mark.timeout(60)

# below and above pyzmq's copy threshold (64 KB): frames are copied, or sent and received in place
SHAPES = [(3, 5), (64, 512), (300, 512)]
DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.bool]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def address(buffer) -> int:
    return torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()


def test_a_contiguous_cpu_tensor_is_framed_as_a_view_of_its_memory():
    x_aD = torch.randn(64, 512, requires_grad=True)
    assert address(tensor_bytes(x_aD)) == x_aD.data_ptr()
    strided = torch.randn(8, 6).t()  # not contiguous: copied, same values
    assert torch.equal(torch.frombuffer(tensor_bytes(strided), dtype=torch.float32), strided.reshape(-1))


def test_a_negated_or_conjugated_view_is_framed_with_its_values():
    conjugated, negated = torch.randn(4, dtype=torch.complex64).conj(), torch._neg_view(torch.randn(4))
    assert conjugated.is_conj()
    assert negated.is_neg()
    for view in (conjugated, negated):
        framed = torch.frombuffer(tensor_bytes(view), dtype=view.dtype)
        assert torch.equal(framed, view.resolve_conj().resolve_neg())


def test_a_decoded_tensor_views_the_received_buffer():
    y_aD = torch.randn(64, 512)
    frames = [bytearray(frame) for frame in encode(Message(Kind.OUTPUT, 3, 1, 2, tensors=[y_aD]))]
    (back,) = decode(frames).tensors
    assert back.data_ptr() == address(frames[3])
    assert torch.equal(back, y_aD)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tensors_cross_a_zmq_socket_pair_bit_exactly(dtype, shape):
    tensor = (torch.randn(shape) * 100).to(dtype)
    message = Message(Kind.FORWARD, 9, 0, 3, meta={"keep": True}, tensors=[tensor, tensor[:1]])
    context = zmq.Context()
    sender, receiver = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    try:
        receiver.bind("inproc://wire-zero-copy")
        sender.connect("inproc://wire-zero-copy")
        sender.send_multipart(encode(message), copy=False)
        assert receiver.poll(5000), "nothing arrived"
        back = decode(receiver.recv_multipart(copy=False))
    finally:
        sender.close(linger=0)
        receiver.close(linger=0)
        context.term()
    assert (back.kind, back.step, back.expert, back.meta) == (Kind.FORWARD, 9, 3, {"keep": True})
    for got, sent in zip(back.tensors, message.tensors, strict=True):
        assert got.dtype == sent.dtype
        assert got.shape == sent.shape
        assert torch.equal(bits(got), bits(sent))


@pytest.mark.parametrize(
    "meta", [b"\xff\xfe{\x00}\x00", b'{"a": "\xc3"}', b"\xef\xbb\xbf{}"], ids=["utf16", "bad-utf8", "bom"]
)
def test_meta_that_is_not_plain_utf8_json_is_refused_with_a_wire_error(meta):
    _, _, *tensor_frames = encode(Message(Kind.OUTPUT, tensors=[torch.zeros(2)]))
    message = Message(Kind.OUTPUT, meta={})
    with pytest.raises(WireError, match="meta is not JSON"):
        decode([_pack_header(message, JSON_CODE, (), meta), meta, *tensor_frames])


def test_a_tensor_frame_of_another_call_is_refused():
    frames = encode(Message(Kind.OUTPUT, 5, 0, 1, tensors=[torch.zeros(2)]))
    other = encode(Message(Kind.OUTPUT, 5, 0, 2, tensors=[torch.zeros(2)]))
    with pytest.raises(WireError, match="different message"):
        decode([*frames[:2], *other[2:]])


def test_host_copies_of_cpu_tensors_share_their_memory_and_drop_autograd():
    x_AD = torch.randn(6, 4, requires_grad=True)
    counts_E = torch.tensor([2, 4])
    x_host, counts_host = host_copies(x_AD, counts_E)
    assert x_host.data_ptr() == x_AD.data_ptr()
    assert not x_host.requires_grad
    assert counts_host.tolist() == [2, 4]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_copies_from_a_gpu_arrive_whole_in_pinned_memory():
    x_AD = torch.randn(300, 512, device="cuda")
    token_idx_A = torch.arange(300, device="cuda")
    x_host, idx_host = host_copies(x_AD, token_idx_A)
    assert x_host.is_pinned()
    assert idx_host.is_pinned()
    assert torch.equal(x_host, x_AD.cpu())
    assert torch.equal(idx_host, token_idx_A.cpu())


def test_the_worker_heap_is_tuned_where_glibc_is():
    tuned = keep_freed_memory()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert tuned
    x = torch.randn(4096, 2048)  # served from the heap now; allocation still works
    assert torch.equal(x.clone(), x)
