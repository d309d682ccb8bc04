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

# A selection bias below this marks a banned expert (PoI bans put −1e4, far below any quality feedback,
# which is clipped to a few units): its balancing bias is frozen while the ban lasts. The router does
# not import the incentives package, so the threshold lives here.
BANNED_BELOW = -1.0e3


@dataclass
class BiasBalancedConfig(RouterConfig):
    name: str = "bias_balanced"
    top_k: int = 2
    # γ: each training step every bias moves by γ·sign(mean load − load). The bias needs about
    # (logit spread)/γ steps to reach its target and then hovers within ±γ of it, so γ trades speed for
    # ripple. Measured on routing_comparison (benchmarks/balance.py, eval-mode load CV, seeds 0 and 1):
    # 1e-3 → 0.35–0.62 at 600 steps (seed 0); 1e-2 → ≤ 0.11 at 300 and 600 steps; 3e-2 → ≤ 0.10 at 300 but up
    # to 0.20 at 600 (ripple). Longer runs, a rule of thumb: γ ≈ 1e-2·√(600 / steps), still crossing the
    # spread within the first few percent of the run, with a ripple that shrinks as the run grows; it
    # gives 1e-3 at ~6·10^4 steps, the paper's value for DeepSeek-V3's ~10^5-step runs.
    bias_update_rate: float = 1e-2
    normalize_gates: bool = True  # renormalise the k gates to sum 1 (DeepSeek-V3); False keeps raw probs


@register("bias_balanced", BiasBalancedConfig)
class BiasBalancedRouter(LearnedRouter):
    """Top-k of logits + a learned-by-counting bias b_E (+ the selection bias); the gate is the softmax
    prob (renormalised over the k), never touched by b_E, so balancing does not distort the outputs and
    needs no aux loss.

    The update b_E += γ·sign(mean load − load) counts the load that logits + b_E alone would give
    (top-k of logits + b_E), never the selection bias: PoI's feedback steers traffic on top of a
    balanced router instead of being cancelled by it, and a penalised expert keeps its lower share.
    An expert whose selection bias is below `BANNED_BELOW` (a PoI ban) keeps its b_E frozen, so it
    does not build up a bias during the ban and flood when the ban ends.

    The update runs inside `forward` while training, after this step's experts are chosen, so the
    next forward sees it; with gradient accumulation it updates once per micro-batch. Evaluation uses
    b_E without changing it (per token, so causal). b_E is a registered buffer: checkpointed.
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
        balance_key_NE = logits_NE.detach() + self.expert_bias_E
        key_NE = selection_key(balance_key_NE, selection_bias_E)
        expert_NK = key_NE.topk(self.config.top_k, dim=-1).indices
        gate_NK = probs_NE.gather(-1, expert_NK)
        if self.config.normalize_gates:
            gate_NK = renormalized(gate_NK)
        if self.training:
            self._update_bias(balance_key_NE, selection_bias_E)
        return self.token_choice_plan(expert_NK, gate_NK, logits_NE, probs_NE)

    @torch.no_grad()
    def _update_bias(self, balance_key_NE: torch.Tensor, selection_bias_E: torch.Tensor | None) -> None:
        balanced_NK = balance_key_NE.topk(self.config.top_k, dim=-1).indices
        load_E = torch.bincount(balanced_NK.flatten(), minlength=self.num_experts).float()
        step_E = self.config.bias_update_rate * torch.sign(load_E.mean() - load_E)
        if selection_bias_E is not None:
            step_E = torch.where(selection_bias_E < BANNED_BELOW, 0.0, step_E)
        self.expert_bias_E += step_E
