"""Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens, C = c·N/E.

Legend: N tokens, D model width, E experts, C tokens per expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from router.common import LearnedRouter, check_config, expert_capacity, selection_key
from router.plan import DispatchPlan, build_plan
from router.registry import RouterConfig, register


@dataclass
class ExpertChoiceConfig(RouterConfig):
    name: str = "expert_choice"
    capacity_factor: float = 2.0  # c: tokens per expert C = ⌈c · N / E⌉, i.e. c experts per token on average


@register("expert_choice", ExpertChoiceConfig)
class ExpertChoiceRouter(LearnedRouter):
    """Every expert takes exactly the C tokens with the highest softmax affinity to it; the gate is that
    affinity. Load is perfectly balanced by construction, but a token may be taken by several experts
    or by none (the fraction with none is logged as `unrouted_frac`; such a token keeps only its
    residual).

    Non-causal in both modes: which tokens an expert takes depends on the whole batch, later positions
    included, so in a decoder a token's output depends on its own future. Evaluation routes exactly as
    training does (same rule, C from the evaluation batch's size): the score measures the model as
    trained, and is flagged non-causal like training. There is no causal form of this rule (an expert
    cannot know a token is among its top C before seeing the rest of the batch). The selection bias is added to the logits
    before the softmax that ranks tokens, so it shifts which tokens an expert prefers relative to
    other experts; an expert whose key is zero for a token (a ban of −inf) never takes it.
    """

    causal_in_training = False
    causal_in_eval = False
    config: ExpertChoiceConfig

    def __init__(self, d_model: int, num_experts: int, config: ExpertChoiceConfig):
        check_config(
            config.capacity_factor > 0, f"router.capacity_factor={config.capacity_factor} must be > 0"
        )
        super().__init__(d_model, num_experts, config)

    def route(self, x_ND, logits_NE, probs_NE, selection_bias_E) -> DispatchPlan:
        num_tokens = x_ND.shape[0]
        key_NE = selection_key(logits_NE, selection_bias_E).softmax(-1)
        capacity = expert_capacity(num_tokens, self.num_experts, self.config.capacity_factor)
        key_EC, token_EC = key_NE.T.topk(capacity, dim=-1)
        expert_EC = torch.arange(self.num_experts, device=x_ND.device)[:, None].expand_as(token_EC)
        taken_EC = key_EC > 0
        token_A, expert_A = token_EC[taken_EC], expert_EC[taken_EC]
        routed_N = torch.zeros(num_tokens, dtype=torch.bool, device=x_ND.device).index_fill_(0, token_A, True)
        return build_plan(
            token_A,
            expert_A,
            probs_NE[token_A, expert_A],
            num_tokens=num_tokens,
            num_experts=self.num_experts,
            probs_NE=probs_NE,
            aux_losses=self.aux_losses(logits_NE, probs_NE, expert_A),
            extra_metrics={"unrouted_frac": 1.0 - routed_N.float().mean()},
        )
