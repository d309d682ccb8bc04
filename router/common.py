"""Pieces shared by the routing strategies: fp32 logits, auxiliary losses, selection keys, capacity
clipping, Sinkhorn balancing, reproducible randomness, and turning per-token choices into a plan.

Legend: N tokens, D model width, E experts, K choices per token, R requests (choices in priority order),
Z buckets (group × expert), X dropped choices.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from router.errors import ConfigError
from router.plan import DispatchPlan, build_plan
from router.registry import RouterConfig
from router.seeds import derive_seed


class Router(nn.Module):
    """The contract every strategy meets: `forward(x_ND, token_ids_N, selection_bias_E) -> DispatchPlan`.

    `token_ids_N` (long [N] or None) is what hash routing keys on; `selection_bias_E` (float [E] or None)
    steers which experts are chosen, never a gate value. A strategy implements `route_tokens`.
    """

    # Causality, declared per mode for the strategy's default options (`causal_for` sees the options).
    # Causal: the routing (experts, gates, drops) of the token at position t of a sequence never changes
    # when tokens after t in that same sequence change, i.e. it depends only on that token, the earlier
    # tokens of its sequence, and data-independent state (parameters, seeded draws). A decoder trained
    # or evaluated with a non-causal router sees its own future there, so its loss is not a causal
    # LM's. Batch-level balancing is non-causal: a token's expert depends on every token of the batch,
    # its own future included. Dependence on *other* sequences of the batch is allowed here (capacity
    # routers count earlier tokens of the flattened batch): no look-ahead into the token's own text,
    # but a batched score can differ from one-sequence generation. tests/router/test_causality.py
    # checks every declaration against the behaviour.
    causal_in_training: bool = True
    causal_in_eval: bool = True

    def __init__(self, num_experts: int, config: RouterConfig):
        super().__init__()
        self.config = config
        self.num_experts = num_experts

    @classmethod
    def causal_for(cls, config: RouterConfig, training: bool) -> bool:
        """Whether a router built from `config` is causal in this mode; a strategy whose causality
        depends on an option overrides this."""
        return cls.causal_in_training if training else cls.causal_in_eval

    def is_causal(self, training: bool | None = None) -> bool:
        """Whether this router is causal in `training` mode (default: its current mode)."""
        return self.causal_for(self.config, self.training if training is None else training)

    def forward(
        self,
        x_ND: torch.Tensor,
        token_ids_N: torch.Tensor | None = None,
        selection_bias_E: torch.Tensor | None = None,
    ) -> DispatchPlan:
        return self.route_tokens(x_ND, token_ids_N, selection_bias_E)

    def route_tokens(self, x_ND, token_ids_N, selection_bias_E) -> DispatchPlan:
        raise NotImplementedError


class LearnedRouter(Router):
    """A linear gate computed in fp32 (also under bf16 autocast) with the shared aux losses; a strategy
    implements `route(x_ND, logits_NE, probs_NE, selection_bias_E)`."""

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig):
        super().__init__(num_experts, config)
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=d_model**-0.5)

    def route_tokens(self, x_ND, token_ids_N, selection_bias_E) -> DispatchPlan:
        logits_NE = self.logits(self.router_input(x_ND))
        return self.route(x_ND, logits_NE, logits_NE.softmax(-1), selection_bias_E)

    def route(self, x_ND, logits_NE, probs_NE, selection_bias_E) -> DispatchPlan:
        """The strategy: which experts each token goes to, with which gates, from the fp32 logits."""
        raise NotImplementedError

    def router_input(self, x_ND: torch.Tensor) -> torch.Tensor:
        """What the gate sees; the experts always get the clean `x_ND` (Switch jitters this)."""
        return x_ND

    def logits(self, x_ND: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x_ND.device.type, enabled=False):
            return F.linear(x_ND.float(), self.gate.weight.float())

    def token_choice_plan(
        self,
        expert_NK: torch.Tensor,
        gate_NK: torch.Tensor,
        logits_NE: torch.Tensor,
        probs_NE: torch.Tensor,
        *,
        balanced_NK: torch.Tensor | None = None,
        **choices: torch.Tensor,
    ) -> DispatchPlan:
        """The plan of per-token choices with this router's aux losses, whose load term counts
        `balanced_NK` (default: every choice). `choices` go to `plan_from_token_choices`."""
        losses = self.aux_losses(logits_NE, probs_NE, expert_NK if balanced_NK is None else balanced_NK)
        return plan_from_token_choices(
            expert_NK, gate_NK, num_experts=self.num_experts, probs_NE=probs_NE, aux_losses=losses, **choices
        )

    def aux_losses(self, logits_NE: torch.Tensor, probs_NE: torch.Tensor, expert_NK: torch.Tensor):
        losses = {}
        if self.config.aux_loss_weight > 0:
            losses["aux_loss"] = self.config.aux_loss_weight * load_balancing_loss(probs_NE, expert_NK)
        if self.config.z_loss_weight > 0:
            losses["z_loss"] = self.config.z_loss_weight * z_loss(logits_NE)
        return losses


def load_balancing_loss(probs_NE: torch.Tensor, expert_NK: torch.Tensor) -> torch.Tensor:
    """Switch Transformer loss E·Σ_i f_i·P_i: f_i the fraction of assignments to i, P_i its mean prob."""
    num_experts = probs_NE.shape[-1]
    counts_E = torch.bincount(expert_NK.flatten(), minlength=num_experts).to(probs_NE.dtype)
    fraction_E = counts_E / counts_E.sum().clamp_min(1.0)
    return num_experts * (fraction_E * probs_NE.mean(0)).sum()


def z_loss(logits_NE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-partition, keeps logits small and routing stable."""
    return torch.logsumexp(logits_NE, dim=-1).square().mean()


def plan_from_token_choices(
    expert_NK: torch.Tensor,
    gate_NK: torch.Tensor,
    *,
    num_experts: int,
    probs_NE: torch.Tensor | None = None,
    aux_losses: dict[str, torch.Tensor] | None = None,
    wanted_NK: torch.Tensor | None = None,
    kept_NK: torch.Tensor | None = None,
    extra_metrics: dict[str, torch.Tensor] | None = None,
) -> DispatchPlan:
    """A plan from per-token choices. `wanted_NK` (bool) marks the choices the strategy asks for (GShard
    discards some second choices on purpose: those are neither routed nor dropped); `kept_NK` marks
    the wanted choices that fit: a wanted choice that is not kept is reported in `dropped`."""
    num_tokens = expert_NK.shape[0]
    first_choice_E = torch.bincount(expert_NK[:, 0], minlength=num_experts)  # before any capacity drop
    token_NK = torch.arange(num_tokens, device=expert_NK.device)[:, None].expand_as(expert_NK)
    dropped_X = None
    if wanted_NK is not None or kept_NK is not None:
        wanted_NK = torch.ones_like(expert_NK, dtype=torch.bool) if wanted_NK is None else wanted_NK
        kept_NK = wanted_NK if kept_NK is None else kept_NK & wanted_NK
        dropped_X = token_NK[wanted_NK & ~kept_NK]
        token_NK, expert_NK, gate_NK = token_NK[kept_NK], expert_NK[kept_NK], gate_NK[kept_NK]
    return build_plan(
        token_NK.flatten(),
        expert_NK.flatten(),
        gate_NK.flatten(),
        num_tokens=num_tokens,
        num_experts=num_experts,
        dropped_X=dropped_X,
        probs_NE=probs_NE,
        aux_losses=aux_losses,
        extra_metrics=extra_metrics,
        first_choice_E=first_choice_E,
    )


def renormalized(gate_NK: torch.Tensor) -> torch.Tensor:
    return gate_NK / gate_NK.sum(-1, keepdim=True).clamp_min(1e-9)


# ---------------------------------------------------------------------------------------------- config checks


def check_config(condition: bool, message: str) -> None:
    """Raise a ConfigError with `message` (naming the key and value) unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


def check_top_k(top_k: int, num_experts: int) -> None:
    check_config(1 <= top_k <= num_experts, f"router.top_k={top_k} must be in [1, experts.num={num_experts}]")


def check_no_router_losses(config: RouterConfig) -> None:
    """Routers without a learned gate have nothing for the aux or z losses to act on: say so, don't ignore."""
    for key in ("aux_loss_weight", "z_loss_weight"):
        value = getattr(config, key)
        check_config(
            value == 0, f"router.{key}={value}: router '{config.name}' has no learned gate; set it to 0"
        )


# ---------------------------------------------------------------------------------------------- selection


def selection_key(logits_NE: torch.Tensor, selection_bias_E: torch.Tensor | None) -> torch.Tensor:
    """What experts are chosen by: detached logits plus the selection-only bias (PoI feedback, bans).

    The bias never reaches a gate value, so quality feedback steers which experts are used without
    scaling their outputs.
    """
    key_NE = logits_NE.detach()
    return key_NE if selection_bias_E is None else key_NE + selection_bias_E


def expert_capacity(
    num_tokens: int, num_experts: int, capacity_factor: float, choices_per_token: int = 1
) -> int:
    """Buffer slots per expert, ⌈factor · k · N / E⌉ (Fedus et al. 2021; Lepikhin et al. 2020), in [1, N]."""
    slots = math.ceil(capacity_factor * choices_per_token * num_tokens / num_experts)
    return max(1, min(slots, num_tokens))


def rank_within_bucket(bucket_R: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """For each request, how many earlier requests (in input order) fell into the same bucket."""
    order_R = torch.argsort(bucket_R, stable=True)
    counts_Z = torch.bincount(bucket_R, minlength=num_buckets)
    start_Z = torch.cumsum(counts_Z, 0) - counts_Z
    rank_sorted_R = torch.arange(bucket_R.numel(), device=bucket_R.device) - start_Z[bucket_R[order_R]]
    return torch.empty_like(rank_sorted_R).scatter_(0, order_R, rank_sorted_R)


def clip_to_capacity(
    expert_NK: torch.Tensor,
    num_experts: int,
    capacity: int,
    *,
    group_N: torch.Tensor | None = None,
    wanted_NK: torch.Tensor | None = None,
    token_order: bool = False,
) -> torch.Tensor:
    """Which choices fit in their expert's buffer of `capacity` slots (per group when `group_N` is given).

    Slots go to earlier tokens first (Switch). With several choices per token, by default all first
    choices take slots before any second choice (the GShard paper's order, in which a token's second
    choice depends on later tokens' first choices: not causal); with `token_order` every choice of a
    token takes its slot before the next token's (causal). Choices not in `wanted_NK` take no slot and
    are not kept. Returns kept_NK (bool).
    """
    num_tokens, k = expert_NK.shape
    bucket_NK = expert_NK if group_N is None else group_N[:, None] * num_experts + expert_NK
    num_buckets = num_experts if group_N is None else (int(group_N.max()) + 1) * num_experts
    if wanted_NK is not None:
        bucket_NK = torch.where(wanted_NK, bucket_NK, num_buckets)  # a spare bucket nobody is kept from
    if token_order:
        rank_NK = rank_within_bucket(bucket_NK.reshape(-1), num_buckets + 1).view(num_tokens, k)
    else:
        rank_NK = rank_within_bucket(bucket_NK.T.reshape(-1), num_buckets + 1).view(k, num_tokens).T
    kept_NK = rank_NK < capacity
    return kept_NK if wanted_NK is None else kept_NK & wanted_NK


def sinkhorn_expert_offsets(logits_NE: torch.Tensor, max_iterations: int, tolerance: float) -> torch.Tensor:
    """Per-expert log offsets v_E that balance the routing distribution (Sinkhorn; Clark et al. 2022).

    Sinkhorn scales exp(logits) by rows u_N and columns v_E until every token carries mass 1 and every
    expert N/E. The row factors never change a token's ranking of experts, so selecting by the
    balanced matrix is selecting by `logits + v_E`. Iterates in log space (no overflow) until the
    token marginals are within `tolerance` of 1, at most `max_iterations` times.
    """
    num_tokens, num_experts = logits_NE.shape
    log_expert_mass = math.log(num_tokens / num_experts)
    v_E = logits_NE.new_zeros(num_experts)
    for _ in range(max_iterations):
        u_N = -torch.logsumexp(logits_NE + v_E, dim=1)
        v_E = log_expert_mass - torch.logsumexp(logits_NE + u_N[:, None], dim=0)
        token_mass_N = torch.logsumexp(logits_NE + u_N[:, None] + v_E, dim=1).exp()
        if float((token_mass_N - 1).abs().max()) < tolerance:
            break
    return v_E


# ---------------------------------------------------------------------------------------------- randomness


class StepRng(nn.Module):
    """Reproducible randomness for a router: step s draws from a generator seeded by (seed, s).

    The step counter is a buffer, so it is checkpointed and a resumed run repeats exactly the draws
    of an uninterrupted one; it advances with every training forward that draws. Evaluation does not
    advance it, so every evaluation batch of a given size sees the same draws. Routers of different
    layers built with the same seed draw the same numbers.
    """

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def generator(self, device: torch.device, advance: bool) -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed(derive_seed(self.seed, "router", int(self.step)))
        if advance:
            self.step += 1
        return generator
