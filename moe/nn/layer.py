"""The MoE layer: router → DispatchPlan → expert pool → combine.

Legend: B batch, T time, N = B·T tokens, D model width, E experts, A assignments sorted by expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from experts.pool import ExpertPool
from router.plan import DispatchPlan


@dataclass
class LayerEvidence:
    """What one step leaves for the PoI scorer: the plan, each assignment's gated output, and
    (after backward) the loss gradient at the layer output."""

    plan: DispatchPlan
    answered_E: torch.Tensor  # bool [E]
    gated_AD: torch.Tensor  # weight_A · y_AD, detached
    grad_out_ND: torch.Tensor | None = None


def combine(
    y_AD: torch.Tensor, plan: DispatchPlan, answered_E: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter `gate · y` back to tokens with one index_add; returns (out_ND, weight_A).

    Assignments of experts that did not answer are masked, and the token's remaining gates are
    rescaled so they carry the token's original gate mass. A token none of whose experts answered
    gets zero here and keeps only its residual.
    """
    weight_A = plan.gate
    answered_A = answered_E[plan.expert_idx]
    if not bool(answered_A.all()):
        weight_A = renormalize_over_answered(plan, answered_A)
    contrib_AD = weight_A[:, None].to(y_AD.dtype) * y_AD
    out_ND = y_AD.new_zeros(plan.num_tokens, y_AD.shape[-1]).index_add_(0, plan.token_idx, contrib_AD)
    return out_ND, weight_A


def renormalize_over_answered(plan: DispatchPlan, answered_A: torch.Tensor) -> torch.Tensor:
    gate_A = plan.gate
    kept_A = torch.where(answered_A, gate_A, torch.zeros_like(gate_A))
    total_N = gate_A.new_zeros(plan.num_tokens).index_add(0, plan.token_idx, gate_A)
    kept_N = gate_A.new_zeros(plan.num_tokens).index_add(0, plan.token_idx, kept_A)
    scale_N = torch.where(kept_N > 0, total_N / kept_N.clamp_min(1e-12), torch.zeros_like(kept_N))
    return kept_A * scale_N[plan.token_idx]


class MoELayer(nn.Module):
    """Routes each token to experts in `pool` and returns their gate-weighted sum (residual added outside).

    The pool is deliberately not a submodule: its parameters belong to the experts' owners and are
    stepped by their own optimizers, never by the trunk optimizer.
    """

    def __init__(self, name: str, router: nn.Module, pool: ExpertPool):
        super().__init__()
        self.name = name
        self.router = router
        self.pool = pool
        # Selection-only bias on router logits (PoI feedback, bans); checkpointed with the model.
        self.register_buffer("selection_bias_E", torch.zeros(pool.num_experts))
        self.keep_evidence = False
        self.last_plan: DispatchPlan | None = None
        self.evidence: LayerEvidence | None = None

    def forward(
        self, x_BTD: torch.Tensor, token_ids_BT: torch.Tensor | None = None, step: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`step` is the training step this call belongs to; the pool's owners see it."""
        batch = x_BTD.shape[0]
        x_ND = rearrange(x_BTD, "b t d -> (b t) d")
        token_ids_N = None if token_ids_BT is None else rearrange(token_ids_BT, "b t -> (b t)")
        plan = self.router(x_ND, token_ids_N, selection_bias_E=self.selection_bias_E)
        pooled = self.pool(x_ND.index_select(0, plan.token_idx), plan, step)
        out_ND, weight_A = combine(pooled.y_AD, plan, pooled.answered_E)
        self.last_plan = plan
        if self.keep_evidence and torch.is_grad_enabled():
            self._keep_evidence(plan, pooled.answered_E, weight_A, pooled.y_AD, out_ND)
        out_BTD = rearrange(out_ND.to(x_BTD.dtype), "(b t) d -> b t d", b=batch)
        return out_BTD, plan.aux_losses

    def _keep_evidence(self, plan, answered_E, weight_A, y_AD, out_ND) -> None:
        gated_AD = (weight_A[:, None] * y_AD).detach().float()
        evidence = LayerEvidence(plan=plan, answered_E=answered_E.detach(), gated_AD=gated_AD)
        self.evidence = evidence
        if out_ND.requires_grad:

            def keep_grad(grad_ND: torch.Tensor) -> None:
                evidence.grad_out_ND = grad_ND.detach().float()

            out_ND.register_hook(keep_grad)
