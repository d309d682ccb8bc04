"""`combine` (through `gated_scatter`) against a plain loop over tokens: outputs and the gradients to the
expert outputs, the gates and the trunk input, for top-1 and top-k plans with dropped assignments and
failed experts, in every dtype the layer combines in; every test on both of `gated_scatter`'s paths
(sparse kernels, and the plain formula it takes for small inputs)."""

from __future__ import annotations

import pytest
import torch

from moe.nn import scatter
from moe.nn.layer import combine, renormalize_over_answered
from moe.nn.scatter import gated_scatter
from router.plan import DispatchPlan, build_plan

N, D, E = 23, 8, 4


@pytest.fixture(autouse=True, params=["sparse", "plain"])
def path(request, monkeypatch):
    """Inputs this small take the plain formula; with no lower bound, float32/64 take the sparse kernels."""
    monkeypatch.setattr(scatter, "SPARSE_MIN_ELEMENTS", 0 if request.param == "sparse" else 2**62)
    return request.param


def routed(
    x_ND: torch.Tensor, router_DE: torch.Tensor, top_k: int, generator: torch.Generator
) -> DispatchPlan:
    """Top-k of softmax(x · router) with about a quarter of the assignments dropped (capacity overflow)."""
    gate_NK, expert_NK = torch.softmax(x_ND @ router_DE, dim=-1).topk(top_k, dim=-1)
    token_A = torch.arange(N).repeat_interleave(top_k)
    kept_A = torch.rand(token_A.shape, generator=generator) > 0.25
    return build_plan(
        token_A[kept_A],
        expert_NK.flatten()[kept_A],
        gate_NK.flatten()[kept_A],
        num_tokens=N,
        num_experts=E,
        dropped_X=token_A[~kept_A],
    )


def experts_of(x_AD: torch.Tensor, plan: DispatchPlan, weights_EDD: torch.Tensor) -> torch.Tensor:
    """A differentiable stand-in for the pool: assignment a through expert `plan.expert_idx[a]`."""
    return torch.tanh(torch.einsum("ad,ade->ae", x_AD, weights_EDD[plan.expert_idx]))


def loop_reference(y_AD: torch.Tensor, plan: DispatchPlan, answered_E: torch.Tensor) -> torch.Tensor:
    """Token by token: the answered assignments' outputs, each gate rescaled so that they carry the
    token's whole gate mass; zero for a token none of whose experts answered."""
    rows = []
    for n in range(plan.num_tokens):
        mine = (plan.token_idx == n).nonzero().flatten().tolist()
        kept = [a for a in mine if answered_E[plan.expert_idx[a]]]
        total = sum((plan.gate[a] for a in mine), torch.zeros(()))
        kept_mass = sum((plan.gate[a] for a in kept), torch.zeros(()))
        row = torch.zeros(y_AD.shape[-1], dtype=torch.float64)
        for a in kept:
            row = row + (plan.gate[a] * total / kept_mass).double() * y_AD[a].double()
        rows.append(row)
    return torch.stack(rows)


def forward_and_gradients(combine_fn, top_k: int, answered_E: torch.Tensor, dtype: torch.dtype):
    """x → plan → experts → `combine_fn` → a fixed linear loss; returns (out, grad x, grad y, grad gate)."""
    generator = torch.Generator().manual_seed(top_k)
    x_ND = torch.randn(N, D, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    router_DE = torch.randn(D, E, generator=generator, dtype=torch.float64).to(dtype)
    weights_EDD = torch.randn(E, D, D, generator=generator, dtype=torch.float64).to(dtype) / D**0.5
    probe_ND = torch.randn(N, D, generator=generator, dtype=torch.float64)
    plan = routed(x_ND, router_DE, top_k, generator)
    plan.gate.retain_grad()
    y_AD = experts_of(x_ND.index_select(0, plan.token_idx), plan, weights_EDD)
    y_AD.retain_grad()
    out_ND = combine_fn(y_AD, plan, answered_E)
    (out_ND.double() * probe_ND).sum().backward()
    assert plan.dropped.numel() > 0
    assert plan.token_idx.numel() > 0
    return out_ND.double(), x_ND.grad.double(), y_AD.grad.double(), plan.gate.grad.double()


def previous_formula(y_AD: torch.Tensor, plan: DispatchPlan, answered_E: torch.Tensor) -> torch.Tensor:
    """What `combine` computed before `gated_scatter`: autograd through `index_add_(w · y)`."""
    answered_A = answered_E[plan.expert_idx]
    weight_A = plan.gate if bool(answered_A.all()) else renormalize_over_answered(plan, answered_A)
    contrib_AD = weight_A[:, None].to(y_AD.dtype) * y_AD
    return y_AD.new_zeros(plan.num_tokens, y_AD.shape[-1]).index_add_(0, plan.token_idx, contrib_AD)


# in bf16 the loop's float64 sums differ from any bf16 arithmetic by its rounding: the previous formula
# (the same bf16 operations) is the reference there. bf16 takes the plain formula on both settings of
# `path` (torch has no bf16 sparse CPU kernels): its cases check that combine keeps it there, unchanged.
REFERENCES = {
    torch.float64: (loop_reference, 1e-10),
    torch.float32: (loop_reference, 1e-5),
    torch.bfloat16: (previous_formula, 1e-6),
}


@pytest.mark.parametrize("dtype", list(REFERENCES))
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("failed", [None, 1])
def test_combine_matches_a_dense_reference_in_outputs_and_gradients(dtype, top_k, failed):
    answered_E = torch.ones(E, dtype=torch.bool)
    if failed is not None:
        answered_E[failed] = False
    reference, tol = REFERENCES[dtype]
    got = forward_and_gradients(lambda y, plan, ans: combine(y, plan, ans)[0], top_k, answered_E, dtype)
    want = forward_and_gradients(reference, top_k, answered_E, dtype)
    for name, g, w in zip(("output", "grad x", "grad y", "grad gate"), got, want, strict=True):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_scatter_gradient_to_one_input_alone(dtype):
    token_A = torch.tensor([2, 0, 2, 1, 0])
    y_AD = torch.randn(5, 3, dtype=dtype)
    weight_A = torch.rand(5, requires_grad=True)
    gated_scatter(y_AD, weight_A, token_A, 4).sum().backward()  # Σ out = Σ_a w[a] · Σ_d y[a]
    torch.testing.assert_close(weight_A.grad, y_AD.float().sum(-1), atol=1e-2, rtol=1e-2)
    y_AD.requires_grad_()
    out_ND = gated_scatter(y_AD, weight_A.detach(), token_A, 4)
    assert out_ND.dtype == dtype
    assert torch.equal(out_ND[3], torch.zeros(3, dtype=dtype))
    out_ND.sum().backward()
    torch.testing.assert_close(
        y_AD.grad.float(), weight_A.detach()[:, None].expand(5, 3), atol=1e-2, rtol=1e-2
    )


def test_gated_scatter_of_no_assignments_is_zeros():
    """No assignments take the plain formula on both settings of `path` (no sparse matrix to build)."""
    y_AD = torch.empty(0, 4, requires_grad=True)
    out_ND = gated_scatter(y_AD, torch.empty(0), torch.empty(0, dtype=torch.long), 3)
    assert torch.equal(out_ND, torch.zeros(3, 4))
    out_ND.sum().backward()
    assert y_AD.grad.shape == (0, 4)


def test_gated_scatter_names_bad_inputs(path):
    with pytest.raises(ValueError, match=r"weight_A \(2,\)"):
        gated_scatter(torch.zeros(3, 4), torch.zeros(2), torch.zeros(3, dtype=torch.long), 3)
    # the plain formula leaves the check to index_add_ (a check of ours would sync a GPU)
    bad_index = r"\[0, 3\); got 0 to 3" if path == "sparse" else "index 3 is out of bounds"
    with pytest.raises((IndexError, RuntimeError), match=bad_index):
        gated_scatter(torch.zeros(2, 4), torch.zeros(2), torch.tensor([0, 3]), 3)


def test_gated_scatter_keeps_float32_under_cpu_autocast():
    """A float32 `y_AD` under bf16 autocast: the plain formula's ops are not autocast, so neither is the sparse
    path (torch has no bf16 sparse CPU kernels: casting would raise)."""
    token_A = torch.tensor([2, 0, 2, 1, 0])
    y_AD = torch.randn(5, 3, requires_grad=True)
    weight_A = torch.rand(5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ND = gated_scatter(y_AD, weight_A, token_A, 4)
    assert out_ND.dtype == torch.float32
    want_ND = torch.zeros(4, 3).index_add_(0, token_A, weight_A.detach()[:, None] * y_AD.detach())
    torch.testing.assert_close(out_ND.detach(), want_ND)
    out_ND.sum().backward()
    torch.testing.assert_close(weight_A.grad, y_AD.detach().sum(-1))
