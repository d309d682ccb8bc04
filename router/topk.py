"""Softmax top-k routing with optional noisy gating (Shazeer et al. 2017), gates renormalised over the k.

Legend: N tokens, D model width, E experts, K choices per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from router.common import (
    LearnedRouter,
    StepRng,
    check_config,
    check_top_k,
    renormalized,
    selection_key,
)
from router.plan import DispatchPlan
from router.registry import RouterConfig, register


@dataclass
class TopKConfig(RouterConfig):
    name: str = "topk"
    top_k: int = 2
    noise_std: float = 0.0  # fixed Gaussian noise on the selection key only, while training (exploration)
    learned_noise: bool = False  # Shazeer's noisy top-k: noise std softplus(x·W_noise), in selection and gate
    seed: int = 0  # noise draws come from (seed, step): reproducible and resumable


@register("topk", TopKConfig)
class TopKRouter(LearnedRouter):
    """Selection by logits (+ noise and selection bias), gate = softmax prob renormalised over the k chosen.

    Two kinds of noise, both only while training. `noise_std` perturbs only which experts are chosen.
    `learned_noise` is Shazeer et al.'s H(x) = x·W_g + ε·softplus(x·W_noise): the noisy logits choose the
    experts *and* make the gates (softmax over the kept k), which is how W_noise learns its scale.
    """

    config: TopKConfig

    def __init__(self, d_model: int, num_experts: int, config: TopKConfig):
        check_top_k(config.top_k, num_experts)
        check_config(config.noise_std >= 0, f"router.noise_std={config.noise_std} must be >= 0")
        super().__init__(d_model, num_experts, config)
        self.rng = StepRng(config.seed)
        self.noise_gate = None
        if config.learned_noise:
            self.noise_gate = nn.Linear(d_model, num_experts, bias=False)
            nn.init.zeros_(self.noise_gate.weight)

    def route(self, x_ND, logits_NE, probs_NE, selection_bias_E) -> DispatchPlan:
        noisy = self.training and (self.config.noise_std > 0 or self.noise_gate is not None)
        generator = self.rng.generator(x_ND.device, advance=True) if noisy else None
        gate_logits_NE = logits_NE
        if self.training and self.noise_gate is not None:
            gate_logits_NE = logits_NE + self._learned_noise(x_ND, generator)
        key_NE = selection_key(gate_logits_NE, selection_bias_E)
        if self.training and self.config.noise_std > 0:
            key_NE = key_NE + self.config.noise_std * gaussian_like(key_NE, generator)
        expert_NK = key_NE.topk(self.config.top_k, dim=-1).indices
        gate_NK = renormalized(gate_logits_NE.softmax(-1).gather(-1, expert_NK))
        return self.token_choice_plan(expert_NK, gate_NK, logits_NE, probs_NE)

    def _learned_noise(self, x_ND: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        with torch.autocast(device_type=x_ND.device.type, enabled=False):
            std_NE = F.softplus(F.linear(x_ND.float(), self.noise_gate.weight.float()))
        return std_NE * gaussian_like(std_NE, generator)


def gaussian_like(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
