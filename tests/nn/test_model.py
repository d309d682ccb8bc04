"""Attention runs the way that is fastest for its size (moe/nn/model.py): under CPU bf16 autocast,
sequences up to `CPU_BF16_SCORES_MAX_SEQ_LEN` with heads of `CPU_BF16_SCORES_MIN_HEAD` and more attend
through explicit bf16 scores, the others through torch's fused kernel, in fp32 for heads with size² · T
below `CPU_BF16_FUSED_MIN_SIZE`, else in bf16; without autocast nothing changes. The LM loss is each token's next-byte cross entropy.

Legend: B batch, H heads, T time, k head width, D model width.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe.errors import ConfigError
from moe.nn.model import (
    CPU_BF16_FUSED_MIN_SIZE,
    CPU_BF16_SCORES_MAX_SEQ_LEN,
    CPU_BF16_SCORES_MIN_HEAD,
    Attention,
    attention_way,
    causal_attention,
)

pytestmark = pytest.mark.timeout(60)


def qkv(seq_len: int, head: int, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seq_len + head)
    return [torch.randn(2, 3, seq_len, head, generator=generator).to(dtype) for _ in range(3)]


def attention_and_grads(q_BHTk, k_BHTk, v_BHTk, dtype, attend):
    """`attend`'s output and the gradients of q, k, v for a fixed output gradient, all in float64."""
    inputs = [t.detach().to(dtype).requires_grad_() for t in (q_BHTk, k_BHTk, v_BHTk)]
    y_BHTk = attend(*inputs)
    grad_BHTk = torch.randn(y_BHTk.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (y_BHTk.double() * grad_BHTk).sum().backward()
    return [y_BHTk.detach().double(), *(t.grad.double() for t in inputs)]


def sdpa(q_BHTk, k_BHTk, v_BHTk):
    return F.scaled_dot_product_attention(q_BHTk, k_BHTk, v_BHTk, is_causal=True)


def autocast_attention(q_BHTk, k_BHTk, v_BHTk, way=None):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return causal_attention(q_BHTk, k_BHTk, v_BHTk, way)


def scores_attention(q_BHTk, k_BHTk, v_BHTk):
    return autocast_attention(q_BHTk, k_BHTk, v_BHTk, way="scores")


def relative_errors(q_BHTk, k_BHTk, v_BHTk, attend) -> list[float]:
    """Relative errors of y, dq, dk, dv from `attend` in bf16 against float64 attention on the same inputs."""
    reference = attention_and_grads(q_BHTk, k_BHTk, v_BHTk, torch.float64, sdpa)
    got = attention_and_grads(q_BHTk, k_BHTk, v_BHTk, torch.bfloat16, attend)
    return [float((t - want).norm() / want.norm()) for t, want in zip(got, reference, strict=True)]


@pytest.mark.parametrize(("seq_len", "head"), [(1, 32), (16, 8), (33, 64), (CPU_BF16_SCORES_MAX_SEQ_LEN, 32)])
def test_scores_attention_matches_float64_attention_to_bf16_rounding(seq_len, head):
    inputs = qkv(seq_len, head)
    fused_errors = relative_errors(*inputs, sdpa)
    errors = relative_errors(*inputs, scores_attention)
    for name, fused_error, error in zip(["y", "dq", "dk", "dv"], fused_errors, errors, strict=True):
        assert error < max(3 * fused_error, 2**-8), (
            f"{name}: relative error {error:.2e} (fused {fused_error:.2e})"
        )


@pytest.mark.parametrize(("seq_len", "head"), [(128, 32), (CPU_BF16_SCORES_MAX_SEQ_LEN, 64)])
def test_scores_attention_stays_within_its_stated_error_when_scores_peak(seq_len, head):
    # scores rounded to bf16 cost precision where they are large (std ~8 here): ~4-7x the fused kernel's
    # error, which keeps them in fp32, as scores_attention's docstring says; this pins the bound
    q_BHTk, k_BHTk, v_BHTk = qkv(seq_len, head)
    peaked_q_BHTk = (8 * q_BHTk.float()).bfloat16()
    errors = relative_errors(peaked_q_BHTk, k_BHTk, v_BHTk, scores_attention)
    assert max(errors) < 2**-5, f"relative errors of y, dq, dk, dv: {errors}"


def test_scores_attention_is_causal():
    q_BHTk, k_BHTk, v_BHTk = qkv(16, 8)
    changed_v_BHTk = v_BHTk.clone()
    changed_v_BHTk[:, :, 9:] += 1  # the future of positions 0..8
    y_BHTk, changed_y_BHTk = (scores_attention(q_BHTk, k_BHTk, v) for v in (v_BHTk, changed_v_BHTk))
    assert y_BHTk.dtype == torch.bfloat16
    assert torch.equal(y_BHTk[:, :, :9], changed_y_BHTk[:, :, :9])
    assert not torch.equal(y_BHTk[:, :, 9:], changed_y_BHTk[:, :, 9:])


LONG_SEQ_LEN = 2 * CPU_BF16_SCORES_MAX_SEQ_LEN
LARGE_HEAD = (
    math.isqrt(CPU_BF16_FUSED_MIN_SIZE // LONG_SEQ_LEN - 1) + 1
)  # the smallest fused bf16 head at this T


def test_long_sequences_with_small_heads_attend_through_the_fused_kernel_in_fp32():
    q_BHTk, k_BHTk, v_BHTk = qkv(LONG_SEQ_LEN, LARGE_HEAD // 2)
    y_BHTk = autocast_attention(q_BHTk, k_BHTk, v_BHTk)
    assert y_BHTk.dtype == torch.float32
    assert torch.equal(y_BHTk, sdpa(q_BHTk.float(), k_BHTk.float(), v_BHTk.float()))


def test_long_sequences_with_large_heads_attend_through_the_fused_kernel_in_bf16():
    q_BHTk, k_BHTk, v_BHTk = qkv(LONG_SEQ_LEN, LARGE_HEAD)
    y_BHTk = autocast_attention(q_BHTk, k_BHTk, v_BHTk)
    assert y_BHTk.dtype == torch.bfloat16
    assert torch.equal(y_BHTk, sdpa(q_BHTk, k_BHTk, v_BHTk))


@pytest.mark.parametrize("seq_len", [16, CPU_BF16_SCORES_MAX_SEQ_LEN + 1])
def test_without_autocast_attention_is_plain_sdpa(seq_len):
    q_BHTk, k_BHTk, v_BHTk = qkv(seq_len, 8, torch.float32)
    assert torch.equal(causal_attention(q_BHTk, k_BHTk, v_BHTk), sdpa(q_BHTk, k_BHTk, v_BHTk))


def test_an_attention_block_under_autocast_trains_through_its_scores():
    torch.manual_seed(0)
    attention = Attention(d_model=64, n_heads=2)
    x_BTD = torch.randn(2, 16, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_BTD = attention(x_BTD)
    y_BTD.float().square().sum().backward()
    assert y_BTD.dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in attention.parameters())
    assert torch.isfinite(x_BTD.grad).all()


@pytest.mark.parametrize("way", ["scores", "fused", "fused_fp32"])
def test_model_attention_forces_one_way_in_every_block(way, monkeypatch):
    from moe.nn.model import ATTENTION_WAYS, TransformerLM
    from tests.helpers import compose

    cfg = compose([f"model.attention={way}", "model.moe_layers=[]"]).model
    model = TransformerLM(cfg, vocab_size=256, make_moe=None)
    called = []
    monkeypatch.setitem(ATTENTION_WAYS, way, lambda *qkv: called.append(way) or sdpa(*qkv))
    tokens_BT = torch.randint(0, 256, (2, 8))
    model(tokens_BT)  # "auto" would take "fused" here
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens_BT)  # and "scores" here (heads of 32, T = 8)
    assert called == [way] * 2 * cfg.n_layers


def test_scores_forced_without_autocast_return_the_inputs_dtype():
    q_BHTk, k_BHTk, v_BHTk = qkv(16, 32, torch.float32)
    y_BHTk = causal_attention(q_BHTk, k_BHTk, v_BHTk, way="scores")
    assert y_BHTk.dtype == torch.float32
    assert torch.allclose(y_BHTk, sdpa(q_BHTk, k_BHTk, v_BHTk), atol=2**-6)


def test_an_unknown_attention_way_names_the_key_and_the_valid_ways():
    with pytest.raises(ConfigError, match=r"model.attention='flash'; valid: auto, scores, fused, fused_fp32"):
        Attention(d_model=64, n_heads=2, way="flash")


@pytest.mark.parametrize(
    ("seq_len", "head", "way"),
    [
        (1, 32, "scores"),
        (128, 32, "scores"),
        (CPU_BF16_SCORES_MAX_SEQ_LEN, 256, "scores"),
        (128, CPU_BF16_SCORES_MIN_HEAD // 2, "fused_fp32"),
        (CPU_BF16_SCORES_MAX_SEQ_LEN, CPU_BF16_SCORES_MIN_HEAD // 2, "fused_fp32"),
        (1024, 16, "fused_fp32"),
        (1024, 32, "fused_fp32"),
        (1024, 64, "fused"),
        (2048, 32, "fused"),
    ],  # fmt: skip
)
def test_the_rule_follows_the_measured_crossovers_and_only_under_cpu_bf16_autocast(seq_len, head, way):
    x_BHTk = torch.empty(1, 1, seq_len, head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention_way(x_BHTk) == way
    with torch.autocast("cpu", dtype=torch.float16):
        assert attention_way(x_BHTk) == "fused"
    assert attention_way(x_BHTk) == "fused"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_lm_loss_of_every_token_is_its_next_byte_cross_entropy(dtype):
    from moe.nn.model import DenseFFN, ModelConfig, TransformerLM

    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, moe_layers=[], dense_d_ff=32, max_seq_len=8)
    model = TransformerLM(cfg, vocab_size=11, make_moe=lambda name, d: DenseFFN(d, 32))
    generator = torch.Generator().manual_seed(0)
    pred_BTY = torch.randn(3, 5, 11, generator=generator).to(dtype)
    targets_BT = torch.randint(0, 11, (3, 5), generator=generator)
    # the reference: -log softmax of each token's logits at its target, in (b t) order, in float64
    log_probs_BTY = torch.log_softmax(pred_BTY.double(), dim=-1)
    expected_N = -log_probs_BTY.gather(-1, targets_BT.unsqueeze(-1)).reshape(-1)
    losses_N = model.loss_per_token(pred_BTY, targets_BT)
    assert losses_N.dtype == torch.float32
    assert losses_N.shape == (15,)
    torch.testing.assert_close(losses_N.double(), expected_N, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        model.loss_per_example(pred_BTY, targets_BT).double(),
        expected_N.view(3, 5).mean(-1),
        rtol=1e-6,
        atol=1e-6,
    )
