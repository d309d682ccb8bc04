"""`gated_scatter`: each token's gate-weighted sum of its expert outputs, `out[n] = Σ_{a: token a = n} w[a]·y[a]`,
with fewer passes over [A, D] than autograd's `index_add_(w · y)`.

Autograd's version writes `w · y` in full before scattering it, and its backward gathers `grad_out` into
an [A, D] buffer, multiplies that by `w` into a second one and by `y` into a third to sum the gate
gradient: at T = 4096, d 512, k = 2 each is 16 MB of memory-bound work on the trainer's one core beside
its workers. On the CPU in float32/64 the scatter is a product with a sparse [N, A] matrix `S` (row n holds
token n's gates at its assignments), which reads `y` once and writes `out` once; the gate gradient is
`grad_out @ yᵀ` sampled at `S`'s pattern (a row-wise dot per assignment, no temporary); and `grad_y` is
gathered and scaled in place. Other dtypes and devices (torch has no sparse CPU kernels for bf16/fp16; a
GPU streams the dense ops at full speed), and small [A, D] (where the sparse kernels' setup costs more
than they save), take the plain formula through autograd. Outputs and gradients equal the plain
formula's up to float rounding, not bit for bit (MKL's product fuses each multiply-add; the gate
gradient's dots sum over D in another order).

Legend: A assignments, N tokens, D model width.
"""

from __future__ import annotations

import warnings

import torch
from torch.autograd.function import once_differentiable

SPARSE_DTYPES = (torch.float32, torch.float64)  # what torch's sparse CSR kernels take on the CPU
# Below this many elements of [A, D] the sparse kernels' setup costs more than the passes they save
# (one thread, fwd + bwd: A = 256, D = 512: 0.63 ms sparse vs 0.42 dense; A = 1024: even; A = 8192: 11 vs 16)
SPARSE_MIN_ELEMENTS = 2**19


def gated_scatter(y_AD: torch.Tensor, weight_A: torch.Tensor, token_idx_A: torch.Tensor, num_tokens: int):
    """[num_tokens, D] in `y_AD`'s dtype: row n is Σ weight_A[a] · y_AD[a] over the assignments a of token
    n (zero for a token with none). Differentiable in `y_AD` and `weight_A`."""
    if y_AD.dim() != 2 or weight_A.shape != y_AD.shape[:1] or token_idx_A.shape != y_AD.shape[:1]:
        raise ValueError(
            f"gated_scatter: y_AD {tuple(y_AD.shape)}, weight_A {tuple(weight_A.shape)} and token_idx_A"
            f" {tuple(token_idx_A.shape)} must be [A, D], [A] and [A]"
        )
    if sparse_ok(y_AD):
        return GatedScatter.apply(y_AD, weight_A, token_idx_A, num_tokens)
    contrib_AD = weight_A[:, None].to(y_AD.dtype) * y_AD
    return y_AD.new_zeros(num_tokens, y_AD.shape[-1]).index_add_(0, token_idx_A, contrib_AD)


class GatedScatter(torch.autograd.Function):
    """The sparse path of `gated_scatter`: forward `S @ y`, backward the sampled gate gradient and `grad_y`
    gathered and scaled in place."""

    @staticmethod
    def forward(ctx, y_AD, weight_A, token_idx_A, num_tokens):
        w_A = weight_A.detach().to(y_AD.dtype)
        S_NA = token_rows(w_A, token_idx_A, num_tokens)
        ctx.save_for_backward(y_AD, w_A, token_idx_A)
        ctx.S_NA, ctx.weight_dtype = S_NA, weight_A.dtype
        # CPU autocast would cast this product to bf16, which the sparse kernels lack; the plain formula
        # (a mul and an index_add, neither autocast) keeps y's dtype there too
        with torch.autocast("cpu", enabled=False):
            return torch.sparse.mm(S_NA, y_AD)

    @staticmethod
    @once_differentiable  # no second derivative: a create_graph backward fails loudly, not silently
    def backward(ctx, grad_out_ND):
        y_AD, w_A, token_idx_A = ctx.saved_tensors
        wants_y, wants_weight = ctx.needs_input_grad[:2]
        grad_out_ND = grad_out_ND.to(y_AD.dtype)
        grad_weight_A = grad_y_AD = None
        if wants_weight:  # ⟨grad_out[token a], y[a]⟩ at S's pattern, in its token-major order: put back
            dots = torch.sparse.sampled_addmm(ctx.S_NA, grad_out_ND, y_AD.T, beta=0.0).values()
            grad_w_A = torch.empty_like(dots).index_copy_(0, ctx.S_NA.col_indices(), dots)
            grad_weight_A = grad_w_A.to(ctx.weight_dtype)
        if wants_y:
            grad_y_AD = grad_out_ND.index_select(0, token_idx_A).mul_(w_A[:, None])
        return grad_y_AD, grad_weight_A, None, None


def sparse_ok(y_AD: torch.Tensor) -> bool:
    cpu_and_sparse_dtype = y_AD.device.type == "cpu" and y_AD.dtype in SPARSE_DTYPES
    return cpu_and_sparse_dtype and y_AD.shape[0] > 0 and y_AD.numel() >= SPARSE_MIN_ELEMENTS


def token_rows(w_A: torch.Tensor, token_idx_A: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """S [num_tokens, A] in CSR: row n holds `w_A[a]` at column a for each assignment a of token n."""
    lowest, highest = (int(i) for i in torch.aminmax(token_idx_A))
    if lowest < 0 or highest >= num_tokens:
        raise IndexError(
            f"gated_scatter: token indices must lie in [0, {num_tokens}); got {lowest} to {highest}"
        )
    order_A = torch.argsort(token_idx_A, stable=True)
    crow_N1 = token_idx_A.new_zeros(num_tokens + 1)
    torch.cumsum(torch.bincount(token_idx_A, minlength=num_tokens), 0, out=crow_N1[1:])
    shape = (num_tokens, w_A.shape[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        # valid by construction (rows from a bincount, columns a permutation): nothing to check
        return torch.sparse_csr_tensor(crow_N1, order_A, w_A[order_A], shape, check_invariants=False)
