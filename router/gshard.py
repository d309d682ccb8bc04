"""GShard routing (Lepikhin et al. 2020): top-2 with per-group expert capacity and a random second expert.

Legend: N tokens, D model width, E experts, K = 2 choices per token.
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
    renormalized,
    selection_key,
)
from router.plan import DispatchPlan
from router.registry import RouterConfig, register


@dataclass
class GShardConfig(RouterConfig):
    name: str = "gshard"
    # While training: slots per expert and group = ⌈factor · 2 · S / E⌉ (the paper's 2S/E at 1.0).
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 2.0
    group_size: int = 1024  # S: capacity is enforced inside each group of S consecutive tokens
    random_second_at_eval: bool = False  # keep the second expert at random at evaluation too (else always)
    # Who gets buffer slots first. "causal": token by token, a token's first then second choice before
    # the next token's, so a token's experts never depend on later tokens. "paper": every first choice
    # of the group before any second choice (Lepikhin et al.): a token's second expert then depends on
    # later tokens' first choices, in training and at evaluation alike (non-causal).
    order: str = "causal"
    aux_loss_weight: float = 0.01  # load-balancing loss over first choices
    seed: int = 0  # second-expert draws come from (seed, step): reproducible and resumable


@register("gshard", GShardConfig)
class GShardRouter(LearnedRouter):
    """Top-2 gating: g₁, g₂ renormalised over the two; the second expert is kept with probability
    min(1, 2·g₂) (the paper's random routing, which skips weak second choices and saves capacity).
    In every group of `group_size` consecutive tokens each expert has a buffer of capacity slots;
    overflow is dropped and listed in `dropped`. A dropped choice's gate is not given to the other
    expert, as in the paper.

    Slot order (`order`): by default token by token, first then second choice of a token before the
    next token's, which is causal (a later token never takes an earlier token's slot); a first choice
    can then lose its slot to an earlier token's second choice. `order: paper` serves every first
    choice of the group before any second choice, as the paper does, so a token's second expert
    depends on its own future tokens: flagged non-causal in both modes (the cap applies at evaluation
    too, with `eval_capacity_factor`).
    """

    ORDERS = ("causal", "paper")
    config: GShardConfig

    @classmethod
    def causal_for(cls, config: GShardConfig, training: bool) -> bool:
        return config.order == "causal"

    def __init__(self, d_model: int, num_experts: int, config: GShardConfig):
        check_config(num_experts >= 2, f"router 'gshard' routes to 2 experts but experts.num={num_experts}")
        for key in ("capacity_factor", "eval_capacity_factor", "group_size"):
            value = getattr(config, key)
            check_config(value > 0, f"router.{key}={value} must be > 0")
        check_config(
            config.order in self.ORDERS, f"router.order={config.order!r} must be one of {self.ORDERS}"
        )
        super().__init__(d_model, num_experts, config)
        self.rng = StepRng(config.seed)

    def route(self, x_ND, logits_NE, probs_NE, selection_bias_E) -> DispatchPlan:
        num_tokens = x_ND.shape[0]
        expert_N2 = selection_key(logits_NE, selection_bias_E).topk(2, dim=-1).indices
        gate_N2 = renormalized(probs_NE.gather(-1, expert_N2))
        wanted_N2 = self._wanted(gate_N2.detach())
        group_size = min(self.config.group_size, num_tokens)
        factor = self.config.capacity_factor if self.training else self.config.eval_capacity_factor
        capacity = expert_capacity(group_size, self.num_experts, factor, choices_per_token=2)
        group_N = torch.arange(num_tokens, device=x_ND.device) // group_size
        kept_N2 = clip_to_capacity(
            expert_N2,
            self.num_experts,
            capacity,
            group_N=group_N,
            wanted_NK=wanted_N2,
            token_order=self.config.order == "causal",
        )
        return self.token_choice_plan(
            expert_N2,
            gate_N2,
            logits_NE,
            probs_NE,
            balanced_NK=expert_N2[:, :1],
            wanted_NK=wanted_N2,
            kept_NK=kept_N2,
        )

    def _wanted(self, gate_N2: torch.Tensor) -> torch.Tensor:
        """First choices always; second choices with probability 2·g₂ (when random routing is on)."""
        wanted_N2 = torch.ones_like(gate_N2, dtype=torch.bool)
        if self.training or self.config.random_second_at_eval:
            generator = self.rng.generator(gate_N2.device, advance=self.training)
            uniform_N = torch.rand(gate_N2.shape[0], generator=generator, device=gate_N2.device)
            wanted_N2[:, 1] = uniform_N < 2 * gate_N2[:, 1]
        return wanted_N2
