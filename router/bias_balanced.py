"""Auxiliary-loss-free load balancing (Wang et al. 2024; DeepSeek-V3): a per-expert bias on the selection key.

Legend: N tokens, D model width, E experts, K choices per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from router.common import (
    LearnedRouter,
    check_config,
    check_top_k,
    renormalized,
    selection_key,
)
from router.plan import DispatchPlan
from router.registry import RouterConfig, register


@dataclass
class BiasBalancedConfig(RouterConfig):
    name: str = "bias_balanced"
    top_k: int = 2
    bias_update_rate: float = 1e-3  # γ: each step every bias moves by γ·sign(mean load − load)
    normalize_gates: bool = True  # renormalise the k gates to sum 1 (DeepSeek-V3); False keeps raw probs


@register("bias_balanced", BiasBalancedConfig)
class BiasBalancedRouter(LearnedRouter):
    """Top-k of logits + a learned-by-counting bias b_E; the gate is the softmax prob (renormalised over
    the k), never touched by b_E, so balancing does not distort the outputs and needs no aux loss.

    The update b_E += γ·sign(mean load − load) runs inside `forward` while training, after this
    step's experts are chosen and from this step's counts, so the next forward sees it; with
    gradient accumulation it therefore updates once per micro-batch. b_E is a registered buffer:
    checkpointed with the model.
    """

    config: BiasBalancedConfig

    def __init__(self, d_model: int, num_experts: int, config: BiasBalancedConfig):
        check_top_k(config.top_k, num_experts)
        check_config(
            config.bias_update_rate >= 0, f"router.bias_update_rate={config.bias_update_rate} must be >= 0"
        )
        super().__init__(d_model, num_experts, config)
        self.register_buffer("expert_bias_E", torch.zeros(num_experts))

    def route(self, x_ND, logits_NE, probs_NE, selection_bias_E) -> DispatchPlan:
        key_NE = selection_key(logits_NE, selection_bias_E) + self.expert_bias_E
        expert_NK = key_NE.topk(self.config.top_k, dim=-1).indices
        gate_NK = probs_NE.gather(-1, expert_NK)
        if self.config.normalize_gates:
            gate_NK = renormalized(gate_NK)
        if self.training:
            self._update_bias(expert_NK)
        return self.token_choice_plan(expert_NK, gate_NK, logits_NE, probs_NE)

    @torch.no_grad()
    def _update_bias(self, expert_NK: torch.Tensor) -> None:
        load_E = torch.bincount(expert_NK.flatten(), minlength=self.num_experts).float()
        self.expert_bias_E += self.config.bias_update_rate * torch.sign(load_E.mean() - load_E)
