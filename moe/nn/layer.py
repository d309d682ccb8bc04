"""The MoE layer: router → DispatchPlan → expert pool → combine.

What a scorer (PoI) may ask of a layer, by name (besides torch's public forward hooks, with which
taylor's curvature term keeps each layer's output tensor):
- `record_evidence()`: from then on every grad-enabled forward keeps its `LayerEvidence` in `evidence`.
- `set_selection_bias(bias_E, term="poi")`: one term of the selection-only bias on router logits (PoI
  feedback and bans: "poi"; expected latency and price: "market"); the router sees their sum.
- `with layer.sequences_routed_alone():`: every sequence of a batch is routed as if it were the batch's
  only one (what one-sequence generation sees), so many prefixes are evaluated in one forward.
- `with layer.side_pass() as side:`: evaluation passes that leave the training step's trace
  (`last_plan`, `evidence`) alone; their own evidence goes to `side.evidence`, the pool's first answer
  is reused while the layer sees the same inputs, and `with side.masking(keep_E):` makes the experts
  outside `keep_E` count as not answering (a counterfactual pass); `side.masking(keep_A=...)` does the
  same for single assignments of the layer's plan (`side.first_plan()`).

Legend: B batch, T time, N = B·T tokens, D model width, E experts, A assignments sorted by expert.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from experts.pool import ExpertPool, PoolOutput
from moe.nn.scatter import gated_scatter
from router.plan import DispatchPlan, concat_plans


@dataclass
class LayerEvidence:
    """What one step leaves for the PoI scorer: the plan, each assignment's gated output, and
    (after backward) the loss gradient at the layer output."""

    plan: DispatchPlan
    answered_E: torch.Tensor  # bool [E]
    gated_AD: torch.Tensor  # weight_A · y_AD, detached
    grad_out_ND: torch.Tensor | None = None


def combine(
    y_AD: torch.Tensor, plan: DispatchPlan, answered_E: torch.Tensor, kept_A: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter `gate · y` back to tokens (`gated_scatter`: no [A, D] temporaries); returns (out_ND, weight_A).

    Assignments of experts that did not answer (and, given `kept_A`, assignments outside it) are
    masked, and the token's remaining gates are rescaled so they carry the token's original gate mass.
    A token none of whose assignments answered gets zero here and keeps only its residual.
    """
    weight_A = plan.gate
    answered_A = answered_E[plan.expert_idx]
    if kept_A is not None:
        answered_A = answered_A & kept_A.to(answered_A.device)
    if not bool(answered_A.all()):
        weight_A = renormalize_over_answered(plan, answered_A)
    return gated_scatter(y_AD, weight_A, plan.token_idx, plan.num_tokens), weight_A


def renormalize_over_answered(plan: DispatchPlan, answered_A: torch.Tensor) -> torch.Tensor:
    gate_A = plan.gate
    kept_A = torch.where(answered_A, gate_A, torch.zeros_like(gate_A))
    total_N = gate_A.new_zeros(plan.num_tokens).index_add(0, plan.token_idx, gate_A)
    kept_N = gate_A.new_zeros(plan.num_tokens).index_add(0, plan.token_idx, kept_A)
    scale_N = torch.where(kept_N > 0, total_N / kept_N.clamp_min(1e-12), torch.zeros_like(kept_N))
    return kept_A * scale_N[plan.token_idx]


@dataclass
class FirstAnswer:
    """The pool's first answer in a side pass, with the inputs it answered."""

    x_AD: torch.Tensor
    plan: DispatchPlan
    output: PoolOutput


class SidePass:
    """One layer's state during `MoELayer.side_pass()`: the evidence of its last grad-enabled forward,
    the pool's first answer (reused for the same inputs, so a pass that masks one layer recomputes
    experts only in the layers after it), and the experts or assignments currently masked."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.evidence: LayerEvidence | None = None
        self.first: FirstAnswer | None = None
        self.keep_E: torch.Tensor | None = None
        self.keep_A: torch.Tensor | None = None

    @contextmanager
    def masking(
        self, keep_E: torch.Tensor | None = None, keep_A: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Inside, experts outside `keep_E` count as not answering: `combine` drops their assignments and
        renormalises each token's remaining gates, exactly the path a real failure takes. `keep_A` masks
        single assignments of the first answer's plan instead (`first_plan()`; the layer's inputs, and so
        its plan, are the same in every pass that masks this layer)."""
        self.keep_E = None if keep_E is None else keep_E.clone()
        self.keep_A = None if keep_A is None else keep_A.clone()
        try:
            yield
        finally:
            self.keep_E = self.keep_A = None

    def first_plan(self) -> DispatchPlan:
        """The plan of the pool's first, unmasked answer."""
        if self.first is None:
            raise RuntimeError("side pass: no forward has reached this layer yet")
        return self.first.plan

    def kept_assignments(self, plan: DispatchPlan) -> torch.Tensor | None:
        """The assignment mask for `plan` (None: no assignment masking); `plan` must be the first one's."""
        if self.keep_A is None:
            return None
        if self.first is None or plan.token_idx.shape != self.keep_A.shape:
            raise RuntimeError("side pass: an assignment mask applies only to the first answer's plan")
        return self.keep_A

    def unmasked_answers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(failed_E, had_tokens_E) of the pool's first, unmasked answer (nothing before any forward)."""
        if self.first is None:
            nothing_E = torch.zeros(self.num_experts, dtype=torch.bool)
            return nothing_E, nothing_E
        return ~self.first.output.answered_E.cpu(), self.first.plan.counts.cpu() > 0

    def answer(self, pool: ExpertPool, x_AD: torch.Tensor, plan: DispatchPlan, step: int) -> PoolOutput:
        """The pool's answer for these inputs (the first one again if they are the same), masked."""
        output = self._reused(x_AD, plan)
        if output is None:
            with pool.evaluation_calls():
                output = pool(x_AD, plan, step)
            if self.first is None:
                self.first = FirstAnswer(x_AD, plan, output)
        if self.keep_E is None:
            return output
        return PoolOutput(output.y_AD, output.answered_E & self.keep_E.to(output.answered_E.device))

    def _reused(self, x_AD: torch.Tensor, plan: DispatchPlan) -> PoolOutput | None:
        first = self.first
        if first is None or x_AD.shape != first.x_AD.shape:
            return None
        same = torch.equal(plan.counts, first.plan.counts) and torch.equal(x_AD, first.x_AD)
        return first.output if same else None


class MoELayer(nn.Module):
    """Routes each token to experts in `pool` and returns their gate-weighted sum (residual added outside).

    The pool is deliberately not a submodule: its parameters belong to the experts' owners and are
    stepped by their own optimizers, never by the trunk optimizer.

    After each forward outside a side pass, `last_plan` is its plan (the trainer's routing metrics) and,
    once `record_evidence()` was called, `evidence` its `LayerEvidence` (PoI, the ledger's failures).
    """

    def __init__(self, name: str, router: nn.Module, pool: ExpertPool):
        super().__init__()
        self.name = name
        self.router = router
        self.pool = pool
        # Selection-only bias on router logits: the sum of its terms (PoI feedback and bans, the market's
        # latency and price); checkpointed with the model, the terms too (as the layer's extra state).
        self.register_buffer("selection_bias_E", torch.zeros(pool.num_experts))
        self.selection_bias_terms: dict[str, torch.Tensor] = {}
        self.last_plan: DispatchPlan | None = None
        self.evidence: LayerEvidence | None = None
        self._recording_evidence = False
        self._side: SidePass | None = None
        self._route_each_sequence = False

    def record_evidence(self) -> None:
        """From now on every grad-enabled forward keeps its `LayerEvidence` in `evidence`."""
        self._recording_evidence = True

    def set_selection_bias(self, bias_E: torch.Tensor, term: str = "poi") -> None:
        """From the next forward on, `bias_E` is the layer's `term` of the bias on the router's selection
        key (not on the gates); the router sees the sum of all terms (in the terms' name order)."""
        self.selection_bias_terms[term] = bias_E.detach().to(self.selection_bias_E).clone()
        terms = [self.selection_bias_terms[name] for name in sorted(self.selection_bias_terms)]
        total_E = terms[0].clone()
        for bias_E in terms[1:]:
            total_E += bias_E.to(total_E.device)
        self.selection_bias_E.copy_(total_E)

    def get_extra_state(self) -> dict:
        return {"selection_bias_terms": {name: t.cpu() for name, t in self.selection_bias_terms.items()}}

    def set_extra_state(self, state: dict) -> None:
        terms = state["selection_bias_terms"]
        self.selection_bias_terms = {name: t.to(self.selection_bias_E) for name, t in terms.items()}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint from before bias terms holds only the sum, which was PoI's bias alone
        extra, total = prefix + "_extra_state", prefix + "selection_bias_E"
        if extra not in state_dict and total in state_dict:
            state_dict[extra] = {"selection_bias_terms": {"poi": state_dict[total]}}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @contextmanager
    def side_pass(self) -> Iterator[SidePass]:
        """Forwards inside are a scorer's evaluation passes: they leave `last_plan` and `evidence` as the
        training step left them and keep their own state in the yielded `SidePass`."""
        self._side = SidePass(self.pool.num_experts)
        try:
            yield self._side
        finally:
            self._side = None

    @contextmanager
    def sequences_routed_alone(self) -> Iterator[None]:
        """Inside, the router sees each sequence of a batch on its own, exactly as when that sequence is
        the whole batch (a non-causal router then cannot look across sequences either); the pool still
        gets one call for the batch."""
        self._route_each_sequence = True
        try:
            yield
        finally:
            self._route_each_sequence = False

    def route(self, x_ND: torch.Tensor, token_ids_N: torch.Tensor | None, batch: int) -> DispatchPlan:
        """The router's plan for the batch's `batch` sequences (flattened in `x_ND`), one sequence at a
        time inside `sequences_routed_alone`."""
        if not self._route_each_sequence or batch == 1:
            return self.router(x_ND, token_ids_N, selection_bias_E=self.selection_bias_E)
        ids = [None] * batch if token_ids_N is None else token_ids_N.chunk(batch)
        return concat_plans(
            [
                self.router(x_TD, ids_T, selection_bias_E=self.selection_bias_E)
                for x_TD, ids_T in zip(x_ND.chunk(batch), ids, strict=True)
            ]
        )

    def forward(
        self, x_BTD: torch.Tensor, token_ids_BT: torch.Tensor | None = None, step: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`step` is the training step this call belongs to; the pool's owners see it."""
        batch = x_BTD.shape[0]
        x_ND = rearrange(x_BTD, "b t d -> (b t) d")
        token_ids_N = None if token_ids_BT is None else rearrange(token_ids_BT, "b t -> (b t)")
        plan = self.route(x_ND, token_ids_N, batch)
        x_AD = x_ND.index_select(0, plan.token_idx)
        side = self._side
        pooled = self.pool(x_AD, plan, step) if side is None else side.answer(self.pool, x_AD, plan, step)
        kept_A = None if side is None else side.kept_assignments(plan)
        out_ND, weight_A = combine(pooled.y_AD, plan, pooled.answered_E, kept_A)
        if side is None:
            self.last_plan = plan
        if torch.is_grad_enabled() and (side is not None or self._recording_evidence):
            evidence = self._evidence(plan, pooled.answered_E, weight_A, pooled.y_AD, out_ND)
            if side is None:
                self.evidence = evidence
            else:
                side.evidence = evidence
        out_BTD = rearrange(out_ND.to(x_BTD.dtype), "(b t) d -> b t d", b=batch)
        return out_BTD, plan.aux_losses

    @staticmethod
    def _evidence(plan, answered_E, weight_A, y_AD, out_ND) -> LayerEvidence:
        """This forward's evidence; its `grad_out_ND` fills in when the backward reaches `out_ND`."""
        gated_AD = (weight_A[:, None] * y_AD).detach().float()
        evidence = LayerEvidence(plan=plan, answered_E=answered_E.detach(), gated_AD=gated_AD)
        if out_ND.requires_grad:

            def keep_grad(grad_ND: torch.Tensor) -> None:
                evidence.grad_out_ND = grad_ND.detach().float()

            out_ND.register_hook(keep_grad)
        return evidence
