"""Switch routing (Fedus et al. 2021): top-1, per-expert capacity, overflow dropped.

Legend: N tokens, D model width, E experts, K = 1 choice per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from router.common import (
    LearnedRouter,
    StepRng,
    check_config,
    clip_to_capacity,
    expert_capacity,
    selection_key,
)
from router.plan import DispatchPlan
from router.registry import RouterConfig, register


@dataclass
class SwitchConfig(RouterConfig):
    name: str = "switch"
    capacity_factor: float = 1.25  # while training: slots per expert = ⌈factor · N / E⌉
    eval_capacity_factor: float = 2.0  # at evaluation (the paper evaluates with more room than it trains)
    jitter_eps: float = 0.0  # multiplicative router-input jitter U(1-ε, 1+ε) while training; 0 turns it off
    aux_loss_weight: float = 0.01  # α of the load-balancing loss α·E·Σ f_i·P_i
    seed: int = 0  # jitter draws come from (seed, step): reproducible and resumable


@register("switch", SwitchConfig)
class SwitchRouter(LearnedRouter):
    """Top-1 by logits (+ selection bias); gate = the chosen expert's softmax prob, so the router learns
    through it. Tokens beyond an expert's capacity, earliest first, are dropped: they keep only the
    residual and are listed in the plan's `dropped`. The load-balancing loss counts the router's choices
    before dropping, as in the paper.

    Causal in both modes: earlier tokens of the flattened batch take slots first, so a later token
    never takes an earlier one's slot. A token's drop still depends on the earlier *sequences* of the
    batch and on the batch size (the capacity), so a batched score can differ from one-sequence
    token-by-token generation, where a one-token buffer never overflows.
    """

    config: SwitchConfig

    def __init__(self, d_model: int, num_experts: int, config: SwitchConfig):
        for key in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(config, key)
            check_config(value > 0, f"router.{key}={value} must be > 0")
        check_config(0 <= config.jitter_eps < 1, f"router.jitter_eps={config.jitter_eps} must be in [0, 1)")
        super().__init__(d_model, num_experts, config)
        self.rng = StepRng(config.seed)

    def route(self, x_ND, logits_NE, probs_NE, selection_bias_E) -> DispatchPlan:
        expert_N1 = selection_key(logits_NE, selection_bias_E).argmax(-1, keepdim=True)
        gate_N1 = probs_NE.gather(-1, expert_N1)
        factor = self.config.capacity_factor if self.training else self.config.eval_capacity_factor
        capacity = expert_capacity(x_ND.shape[0], self.num_experts, factor)
        kept_N1 = clip_to_capacity(expert_N1, self.num_experts, capacity)
        return self.token_choice_plan(expert_N1, gate_N1, logits_NE, probs_NE, kept_NK=kept_N1)

    def router_input(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Router input times U(1-ε, 1+ε) noise; only the router sees it, the experts get the clean x."""
        if not (self.training and self.config.jitter_eps > 0):
            return x_ND
        generator = self.rng.generator(x_ND.device, advance=True)
        uniform_ND = torch.rand(x_ND.shape, generator=generator, device=x_ND.device, dtype=torch.float32)
        return x_ND.float() * (1 - self.config.jitter_eps + 2 * self.config.jitter_eps * uniform_ND)
