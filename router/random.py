"""Uniformly random routing: a baseline every learned router should beat (cf. Roller et al. 2021).

Legend: N tokens, D model width, E experts, K choices per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from router.common import Router, StepRng, check_no_router_losses, check_top_k, plan_from_token_choices
from router.plan import DispatchPlan
from router.registry import RouterConfig, register


@dataclass
class RandomConfig(RouterConfig):
    name: str = "random"
    top_k: int = 1
    seed: int = 0  # draws come from (seed, step): reproducible, and resumed runs repeat them


@register("random", RandomConfig)
class RandomRouter(Router):
    """Every token gets k distinct experts drawn uniformly at random, each with gate 1/k.

    Training draws fresh experts every step; evaluation reuses one draw (the step counter does not
    advance), so evaluation is deterministic. The selection bias is ignored: a bias would make the
    choice non-uniform, and this router is the uniform baseline.
    """

    config: RandomConfig

    def __init__(self, d_model: int, num_experts: int, config: RandomConfig):
        check_no_router_losses(config)
        check_top_k(config.top_k, num_experts)
        super().__init__(num_experts, config)
        self.rng = StepRng(config.seed)

    def route_tokens(self, x_ND, token_ids_N, selection_bias_E) -> DispatchPlan:
        generator = self.rng.generator(x_ND.device, advance=self.training)
        uniform_NE = torch.rand((x_ND.shape[0], self.num_experts), generator=generator, device=x_ND.device)
        expert_NK = uniform_NE.topk(self.config.top_k, dim=-1).indices
        gate_NK = torch.full(expert_NK.shape, 1.0 / self.config.top_k, device=x_ND.device)
        return plan_from_token_choices(expert_NK, gate_NK, num_experts=self.num_experts)
