"""Row buckets (experts/rows.py): a padded expert call gives the unpadded call's outputs and gradients,
the buckets are few, minimal and aligned, and `auto` pads only under CPU autocast, in every pool.

Legend: a rows of one expert call, D model width, E experts.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from experts.errors import ConfigError
from experts.modules import FFN, ExpertsConfig
from experts.owner import ExpertOwner
from experts.pool import LocalPool
from experts.rows import ALIGN, DEFAULT_GROWTH, MINIMUM_ROWS, ComputeSettings, RowBuckets
from router.plan import build_plan

pytestmark = pytest.mark.timeout(60)

D, F_HIDDEN = 8, 16
ALWAYS = RowBuckets(auto=False)
ROW_COUNTS = (1, 3, 17, 100, 257)


def integer_ffn(activation: str) -> FFN:
    """An FFN whose every sum is exact in fp32 whatever order the BLAS adds in: small integer weights,
    pre-activations ≥ 24, where GELU, SiLU and their derivatives round to the identity and to 1."""
    ffn = FFN(D, F_HIDDEN, activation)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ffn.w_in.weight.copy_(torch.randint(1, 3, ffn.w_in.weight.shape, generator=generator))
        ffn.w_out.weight.copy_(torch.randint(-1, 2, ffn.w_out.weight.shape, generator=generator))
    return ffn


def outputs_and_gradients(call, module: torch.nn.Module, x_aD: torch.Tensor, grad_aD: torch.Tensor):
    """call(x) with its gradients to x and to every parameter of `module`, which it leaves zeroed."""
    x_aD = x_aD.clone().requires_grad_()
    y_aD = call(x_aD)
    y_aD.backward(grad_aD)
    got = [y_aD.detach(), x_aD.grad, *(p.grad.clone() for p in module.parameters())]
    module.zero_grad(set_to_none=True)
    return got


def rows_seen(module: torch.nn.Module) -> list[int]:
    seen: list[int] = []
    module.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].shape[0]))
    return seen


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("buckets", [ALWAYS, RowBuckets(growth=2.0, auto=False)], ids=["default", "growth2"])
def test_a_padded_call_gives_the_unpadded_outputs_and_gradients_bit_for_bit(activation, buckets):
    ffn = integer_ffn(activation)
    seen = rows_seen(ffn)
    generator = torch.Generator().manual_seed(1)
    for count in ROW_COUNTS:
        x_aD = torch.randint(3, 5, (count, D), generator=generator).float()
        grad_aD = torch.randint(-1, 2, (count, D), generator=generator).float()
        plain = outputs_and_gradients(ffn, ffn, x_aD, grad_aD)
        padded = outputs_and_gradients(lambda x: buckets.call(ffn, x), ffn, x_aD, grad_aD)
        assert seen[-1] == buckets.rows(count)
        assert seen[-1] > count or count % ALIGN == 0  # the call was padded
        for want, got in zip(plain, padded, strict=True):
            assert torch.equal(got, want)


def test_with_real_weights_padding_only_changes_the_order_of_summation():
    """Random fp32 values: the BLAS picks its summation order from the shape, so sums over rows (the
    parameter gradients) may differ in the last bits, never more."""
    torch.manual_seed(0)
    ffn = FFN(64, 128)
    for count in ROW_COUNTS:
        x_aD, grad_aD = torch.randn(count, 64), torch.randn(count, 64)
        plain = outputs_and_gradients(ffn, ffn, x_aD, grad_aD)
        padded = outputs_and_gradients(lambda x: ALWAYS.call(ffn, x), ffn, x_aD, grad_aD)
        for want, got in zip(plain, padded, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("growth", [DEFAULT_GROWTH, 2**0.5, 2.0, 1.05])
def test_buckets_are_the_smallest_aligned_ones_and_few(growth):
    buckets = RowBuckets(growth=growth, auto=False)
    sizes = [buckets.rows(count) for count in range(1, 4097)]
    series = sorted(set(sizes))
    assert all(size >= count for count, size in zip(range(1, 4097), sizes, strict=True))
    assert all(size % ALIGN == 0 and size >= MINIMUM_ROWS for size in series)
    assert sizes == sorted(sizes)  # each count goes to the smallest bucket of the series at or above it
    assert all(sizes[count - 1] == min(s for s in series if s >= count) for count in range(1, 4097))
    assert len(series) <= math.ceil(math.log(4096 / MINIMUM_ROWS, growth)) + 1  # a bounded set: log_g(rows)
    assert len(series) <= 4096 // ALIGN


def test_auto_pads_only_under_cpu_autocast_and_leaves_fp32_calls_alone():
    ffn = FFN(D, F_HIDDEN)
    seen = rows_seen(ffn)
    x_aD = torch.randn(37, D)
    auto = RowBuckets.parse("auto")
    assert torch.equal(auto.call(ffn, x_aD), ffn(x_aD))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_aD = auto.call(ffn, x_aD)
        assert RowBuckets.parse("off").call(ffn, x_aD).shape == (37, D)
    assert y_aD.shape == (37, D)
    assert y_aD.dtype == torch.bfloat16
    assert seen == [37, 37, auto.rows(37), 37]
    assert auto.call(ffn, torch.randn(0, D)).shape == (0, D)  # an empty call stays empty
    assert seen[-1] == 0


@pytest.mark.parametrize(
    ("spec", "growth", "auto"),
    [
        ("auto", DEFAULT_GROWTH, True),
        ("off", None, False),
        ("on", DEFAULT_GROWTH, False),
        ("1.5", 1.5, False),
        (2, 2.0, False),
        (False, None, False),  # YAML's `off`
        (True, DEFAULT_GROWTH, False),
    ],
)
def test_row_bucket_specs_parse(spec, growth, auto):
    assert RowBuckets.parse(spec) == RowBuckets(growth=growth, auto=auto)


@pytest.mark.parametrize("spec", ["fast", "1", "0.5", "4.5", "nan", "inf", "-2", ""])
def test_a_bad_row_bucket_spec_fails_naming_it(spec):
    with pytest.raises(ConfigError, match=f"experts.row_buckets='{spec}'; valid: auto, off, on"):
        RowBuckets.parse(spec)
    with pytest.raises(ConfigError, match="row_buckets"):
        ExpertOwner(FFN(D, F_HIDDEN), compute=ComputeSettings(row_buckets=spec))


def test_the_experts_config_carries_row_buckets_to_the_local_pool_owners():
    torch.manual_seed(0)
    experts = [FFN(D, F_HIDDEN) for _ in range(2)]
    bucketed = LocalPool(copy.deepcopy(experts), compute=ExpertsConfig(num=2, d_ff=F_HIDDEN, row_buckets="2"))
    plain = LocalPool(copy.deepcopy(experts), compute=ExpertsConfig(num=2, d_ff=F_HIDDEN, row_buckets="off"))
    seen = [rows_seen(pool.experts[0]) for pool in (bucketed, plain)]
    plan = build_plan(
        torch.arange(20), torch.tensor([0] * 19 + [1]), torch.ones(20), num_tokens=20, num_experts=2
    )
    x_AD = torch.randn(20, D)
    y_bucketed, y_plain = bucketed(x_AD, plan).y_AD, plain(x_AD, plan).y_AD
    assert seen == [[32], [19]]
    torch.testing.assert_close(y_bucketed, y_plain, rtol=1e-5, atol=1e-6)
