"""Sinkhorn-balanced top-k routing (S-BASE; Clark et al. 2022).

Legend: N tokens, D model width, E experts, K choices per token.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.common import (
    LearnedRouter,
    check_config,
    check_top_k,
    selection_key,
    sinkhorn_expert_offsets,
)
from router.plan import DispatchPlan
from router.registry import RouterConfig, register


@dataclass
class SinkhornConfig(RouterConfig):
    name: str = "sinkhorn"
    top_k: int = 1
    sinkhorn_iterations: int = 20  # at most this many Sinkhorn rounds per step
    sinkhorn_tolerance: float = 1e-2  # stop once every token's mass is within this of 1


@register("sinkhorn", SinkhornConfig)
class SinkhornRouter(LearnedRouter):
    """While training, experts are chosen by the Sinkhorn-balanced routing matrix (approximately N·k/E
    tokens each, no tokens dropped); at evaluation by plain top-k of the logits, which is causal.
    The gate is σ(logit) of each chosen expert, as in BASE and Megatron's Sinkhorn router, so the
    router learns through it.

    Sinkhorn's balancing is a per-expert offset on the logits (see `sinkhorn_expert_offsets`), so the
    selection bias is added after it: balancing would otherwise cancel a per-expert bias.
    """

    config: SinkhornConfig

    def __init__(self, d_model: int, num_experts: int, config: SinkhornConfig):
        check_top_k(config.top_k, num_experts)
        check_config(
            config.sinkhorn_iterations >= 1,
            f"router.sinkhorn_iterations={config.sinkhorn_iterations} must be >= 1",
        )
        super().__init__(d_model, num_experts, config)

    def route(self, x_ND, logits_NE, probs_NE, selection_bias_E) -> DispatchPlan:
        key_NE = selection_key(logits_NE, selection_bias_E)
        if self.training:
            key_NE = key_NE + sinkhorn_expert_offsets(
                logits_NE.detach(), self.config.sinkhorn_iterations, self.config.sinkhorn_tolerance
            )
        expert_NK = key_NE.topk(self.config.top_k, dim=-1).indices
        gate_NK = logits_NE.gather(-1, expert_NK).sigmoid()
        return self.token_choice_plan(expert_NK, gate_NK, logits_NE, probs_NE)
