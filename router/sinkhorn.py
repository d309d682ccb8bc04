"""Sinkhorn-balanced top-k routing (S-BASE; Clark et al. 2022).

Legend: N tokens, D model width, E experts, K choices per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    # τ: Sinkhorn balances exp(logits / τ). Sinkhorn makes the *soft* matrix balanced; its argmax is
    # balanced only when the rows are sharp. This repo's routers' logits are flat (std ≈ 1), so at τ = 1
    # the argmax stays skewed (hard load CV 0.6); a small τ sharpens the rows so the argmax follows the
    # balanced matrix. Measured (benchmarks/balance.py, routing_comparison, 600 steps): τ = 1 eval load
    # CV 0.27–0.41; τ = 0.1 with 50 rounds 0.12–0.14 (training batches ≈ 0.05). Below ≈ 0.05 Sinkhorn
    # needs many more rounds to converge and balance gets worse again.
    temperature: float = 0.1
    # At most this many Sinkhorn rounds per step: a small τ converges more slowly (τ = 0.1 needs ≈ 50).
    sinkhorn_iterations: int = 50
    sinkhorn_tolerance: float = 1e-2  # stop once every token's mass is within this of 1
    # Evaluation adds a running mean of the training offsets (per expert, so per token and causal),
    # weighting each step by 1 − momentum; False: plain top-k of the logits (greedy) at evaluation.
    eval_with_offsets: bool = True
    offset_momentum: float = 0.99


@register("sinkhorn", SinkhornConfig)
class SinkhornRouter(LearnedRouter):
    """While training, experts are chosen by the Sinkhorn-balanced routing matrix of exp(logits / τ):
    every expert receives mass N/E of the soft matrix, and with a small enough τ its argmax is close to
    balanced too (not exactly: tokens with identical rows all go to the same expert, and the argmax of a
    balanced matrix need not be balanced). No tokens are dropped. The gate is σ(logit) of each chosen
    expert, as in BASE and Megatron's Sinkhorn router, so the router learns through it.

    Training and evaluation route differently. Sinkhorn over a batch is not causal (a token's expert
    depends on every other token in the batch, its own future included), so evaluation never runs it:
    it adds a per-expert offset fixed after training, the running mean of the training steps' offsets
    (`eval_with_offsets`, default), which is causal and approximates the trained routing; or, with
    `eval_with_offsets=False`, plain top-k of the logits, which the model never trained with and
    which is typically far from balanced.

    Sinkhorn's balancing is a per-expert offset on the logits (see `sinkhorn_expert_offsets`), so the
    selection bias is added after it: balancing would otherwise cancel a per-expert bias.
    """

    causal_in_training = False  # balancing runs over the whole batch: a token's expert depends on others

    config: SinkhornConfig

    def __init__(self, d_model: int, num_experts: int, config: SinkhornConfig):
        check_top_k(config.top_k, num_experts)
        check_config(
            config.sinkhorn_iterations >= 1,
            f"router.sinkhorn_iterations={config.sinkhorn_iterations} must be >= 1",
        )
        check_config(config.temperature > 0, f"router.temperature={config.temperature} must be > 0")
        check_config(
            0 <= config.offset_momentum < 1,
            f"router.offset_momentum={config.offset_momentum} must be in [0, 1)",
        )
        super().__init__(d_model, num_experts, config)
        self.register_buffer("eval_offset_E", torch.zeros(num_experts))

    def route(self, x_ND, logits_NE, probs_NE, selection_bias_E) -> DispatchPlan:
        if self.training:
            offset_E = self._balancing_offsets(logits_NE.detach())
            self._track(offset_E)
        else:
            offset_E = (
                self.eval_offset_E if self.config.eval_with_offsets else torch.zeros_like(self.eval_offset_E)
            )
        key_NE = selection_key(logits_NE + offset_E, selection_bias_E)
        expert_NK = key_NE.topk(self.config.top_k, dim=-1).indices
        gate_NK = logits_NE.gather(-1, expert_NK).sigmoid()
        return self.token_choice_plan(expert_NK, gate_NK, logits_NE, probs_NE)

    def _balancing_offsets(self, logits_NE: torch.Tensor) -> torch.Tensor:
        """Per-expert offsets in logit units: ranking by logits + τ·v_E is ranking by the balanced matrix
        of exp(logits / τ). Centred, since a common shift changes no ranking and would drift the mean."""
        temperature = self.config.temperature
        v_E = sinkhorn_expert_offsets(
            logits_NE / temperature, self.config.sinkhorn_iterations, self.config.sinkhorn_tolerance
        )
        offset_E = temperature * v_E
        return offset_E - offset_E.mean()

    @torch.no_grad()
    def _track(self, offset_E: torch.Tensor) -> None:
        self.eval_offset_E.lerp_(offset_E, 1 - self.config.offset_momentum)
