"""Attention runs in the precision that is fastest for its size (moe/nn/model.py): under CPU bf16 autocast,
heads whose size² · sequence length is below `CPU_BF16_ATTENTION_MIN_SIZE` attend in fp32, larger ones
in bf16; without autocast nothing changes.

Legend: B batch, H heads, T time, k head width, D model width.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe.nn.model import CPU_BF16_ATTENTION_MIN_SIZE, Attention, attention_in_fp32, causal_attention

pytestmark = pytest.mark.timeout(60)


SEQ_LEN = 32
LARGE_HEAD = int(
    (CPU_BF16_ATTENTION_MIN_SIZE / SEQ_LEN) ** 0.5
)  # the smallest head attending in bf16 at T=32


def qkv(head: int, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(head)
    return [torch.randn(2, 2, SEQ_LEN, head, generator=generator).to(dtype) for _ in range(3)]


def test_small_heads_attend_in_fp32_under_cpu_bf16_autocast():
    q_BHTk, k_BHTk, v_BHTk = qkv(LARGE_HEAD // 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_BHTk = causal_attention(q_BHTk, k_BHTk, v_BHTk)
    reference = F.scaled_dot_product_attention(q_BHTk.float(), k_BHTk.float(), v_BHTk.float(), is_causal=True)
    assert y_BHTk.dtype == torch.float32
    assert torch.equal(y_BHTk, reference)


def test_large_heads_attend_in_bf16_under_cpu_bf16_autocast():
    q_BHTk, k_BHTk, v_BHTk = qkv(LARGE_HEAD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_BHTk = causal_attention(q_BHTk, k_BHTk, v_BHTk)
        reference = F.scaled_dot_product_attention(q_BHTk, k_BHTk, v_BHTk, is_causal=True)
    assert y_BHTk.dtype == torch.bfloat16
    assert torch.equal(y_BHTk, reference)


@pytest.mark.parametrize("head", [16, LARGE_HEAD])
def test_without_autocast_attention_is_plain_sdpa(head):
    q_BHTk, k_BHTk, v_BHTk = qkv(head, torch.float32)
    reference = F.scaled_dot_product_attention(q_BHTk, k_BHTk, v_BHTk, is_causal=True)
    assert torch.equal(causal_attention(q_BHTk, k_BHTk, v_BHTk), reference)


def test_an_attention_block_under_autocast_trains_through_its_fp32_heads():
    torch.manual_seed(0)
    attention = Attention(d_model=64, n_heads=2)  # head 32 at T=16: fp32 inside, bf16 projections around
    x_BTD = torch.randn(2, 16, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_BTD = attention(x_BTD)
    y_BTD.float().square().sum().backward()
    assert y_BTD.dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in attention.parameters())
    assert torch.isfinite(x_BTD.grad).all()


@pytest.mark.parametrize(
    ("head", "seq_len", "fp32"),
    [
        (32, 128, True),
        (64, 128, True),
        (128, 128, False),
        (32, 512, True),
        (64, 512, False),
        (128, 32, True),
        (256, 32, False),
    ],  # fmt: skip
)
def test_the_rule_follows_the_measured_crossover_and_only_under_cpu_autocast(head, seq_len, fp32):
    x_BHTk = torch.empty(1, 1, seq_len, head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention_in_fp32(x_BHTk) == fp32
    assert not attention_in_fp32(x_BHTk)


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
