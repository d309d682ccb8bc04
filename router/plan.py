"""The one shape every routing strategy returns: flat token→expert assignments sorted by expert.

Legend: N tokens, E experts, A assignments (token, expert) pairs, K choices per token, X dropped choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DispatchPlan:
    """Which tokens go to which expert, with what gate, as flat assignments sorted by expert.

    `token_idx[a]` is routed to `expert_idx[a]` with weight `gate[a]`; the slice of expert e is
    `counts[:e].sum() : counts[:e+1].sum()`. `dropped` lists the token index of every assignment a
    strategy wanted but dropped (capacity overflow), one entry per dropped assignment.
    `first_choice_counts` counts each token's first choice before any capacity limit (None where a
    strategy has no per-token first choice, as expert choice): the imbalance the router asked for.
    """

    token_idx: torch.Tensor  # long [A]
    expert_idx: torch.Tensor  # long [A], non-decreasing
    gate: torch.Tensor  # float [A], differentiable w.r.t. the router
    counts: torch.Tensor  # long [E]
    dropped: torch.Tensor  # long [D]
    num_tokens: int
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    first_choice_counts: torch.Tensor | None = None  # long [E]

    @property
    def num_experts(self) -> int:
        return self.counts.numel()

    def split_sizes(self) -> list[int]:
        """Per-expert slice lengths, as Python ints for `torch.split`."""
        return self.counts.tolist()


def build_plan(
    token_idx_A: torch.Tensor,
    expert_idx_A: torch.Tensor,
    gate_A: torch.Tensor,
    *,
    num_tokens: int,
    num_experts: int,
    dropped_X: torch.Tensor | None = None,
    probs_NE: torch.Tensor | None = None,
    aux_losses: dict[str, torch.Tensor] | None = None,
    extra_metrics: dict[str, torch.Tensor] | None = None,
    first_choice_E: torch.Tensor | None = None,
) -> DispatchPlan:
    """Sort assignments by expert (stable, so token order is kept inside an expert) and add metrics."""
    order_A = torch.argsort(expert_idx_A, stable=True)
    token_idx_A, expert_idx_A, gate_A = token_idx_A[order_A], expert_idx_A[order_A], gate_A[order_A]
    counts_E = torch.bincount(expert_idx_A, minlength=num_experts)
    if dropped_X is None:
        dropped_X = token_idx_A.new_empty(0)
    metrics = routing_metrics(counts_E, dropped_X.numel(), probs_NE, first_choice_E)
    metrics.update(extra_metrics or {})
    losses = dict(aux_losses or {})
    for name, loss in losses.items():
        metrics[name] = loss.detach()
    return DispatchPlan(
        token_idx=token_idx_A,
        expert_idx=expert_idx_A,
        gate=gate_A,
        counts=counts_E,
        dropped=dropped_X,
        num_tokens=num_tokens,
        aux_losses=losses,
        metrics=metrics,
        first_choice_counts=first_choice_E,
    )


def routing_metrics(
    counts_E: torch.Tensor,
    num_dropped: int,
    probs_NE: torch.Tensor | None = None,
    first_choice_E: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Load balance and routing-confidence statistics shared by every strategy.

    load_cv: std/mean of per-expert load; max_vio: max load / mean load - 1 (MaxVio, Wang et al. 2024);
    dropped_frac: dropped / requested assignments; entropy: mean router entropy per token (nats);
    first_choice_max_vio: MaxVio of the tokens' first choices before capacity drops.
    """
    load_E = counts_E.float()
    mean_load = load_E.mean().clamp_min(1e-9)
    requested = load_E.sum() + num_dropped
    metrics = {
        "load_cv": load_E.std(unbiased=False) / mean_load,
        "max_vio": load_E.max() / mean_load - 1.0,
        "unused_experts": (counts_E == 0).sum().float(),
        "dropped_frac": torch.tensor(float(num_dropped)) / requested.clamp_min(1.0),
    }
    if first_choice_E is not None:
        first_E = first_choice_E.float()
        metrics["first_choice_max_vio"] = first_E.max() / first_E.mean().clamp_min(1e-9) - 1.0
    if probs_NE is not None and probs_NE.numel() > 0:
        p_NE = probs_NE.detach().float()
        metrics["entropy"] = -(p_NE * p_NE.clamp_min(1e-12).log()).sum(-1).mean()
    return metrics


def concat_plans(plans: list[DispatchPlan]) -> DispatchPlan:
    """One plan for the tokens of `plans` laid end to end (plan i's tokens after plan i-1's), each routed
    as its own plan decided (plans of one router, so with the same aux losses, averaged here). Metrics
    are recomputed from the combined counts; strategy-specific extras are not carried over."""
    if len(plans) == 1:
        return plans[0]
    offsets = [0]
    for plan in plans[:-1]:
        offsets.append(offsets[-1] + plan.num_tokens)
    first_choices = [plan.first_choice_counts for plan in plans]
    aux_losses = {
        name: torch.stack([p.aux_losses[name] for p in plans]).mean() for name in plans[0].aux_losses
    }
    return build_plan(
        torch.cat([plan.token_idx + offset for plan, offset in zip(plans, offsets, strict=True)]),
        torch.cat([plan.expert_idx for plan in plans]),
        torch.cat([plan.gate for plan in plans]),
        num_tokens=offsets[-1] + plans[-1].num_tokens,
        num_experts=plans[0].num_experts,
        dropped_X=torch.cat([plan.dropped + offset for plan, offset in zip(plans, offsets, strict=True)]),
        aux_losses=aux_losses,
        first_choice_E=None if any(c is None for c in first_choices) else torch.stack(first_choices).sum(0),
    )
