"""BASE layers (Lewis et al. 2021): a balanced assignment, every expert exactly N/E tokens, while training.

Legend: N tokens, D model width, E experts, U unassigned tokens, P tokens holding a slot,
Q candidates (holding + bidding).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from router.common import (
    LearnedRouter,
    check_config,
    rank_within_bucket,
    selection_key,
)
from router.plan import DispatchPlan
from router.registry import RouterConfig, register

log = logging.getLogger(__name__)


@dataclass
class BaseConfig(RouterConfig):
    name: str = "base"
    # Minimum bid raise as a fraction of the score range: the total is within N·ε·range of the optimum.
    auction_epsilon: float = 1e-3
    # Rounds per ε phase; tokens still free after the last phase take the open slots greedily.
    auction_phase_rounds: int = 48
    # How evaluation routes. "greedy": top-1 by logits (the paper's choice), causal. "balanced": the
    # training assignment, so the score measures the model as trained, but non-causal (a token's expert
    # depends on the whole batch, its own future included).
    eval_routing: str = "greedy"


@register("base", BaseConfig)
class BaseRouter(LearnedRouter):
    """Training: the assignment of tokens to experts maximising Σ h_t·w_e subject to every expert getting
    exactly N/E tokens (within one when E does not divide N), solved by an auction. The gate is
    σ(h_t·w_e) of the chosen expert, through which the router learns.

    Non-causal while training: the balanced assignment gives a token the expert that fits the whole
    batch, its own future tokens included. The way it was trained cannot be run causally, so
    evaluation by default routes greedily (top-1 by logits, as in the paper), which is causal but is not
    how the model was trained: its load is unbalanced and its score can differ from a balanced one.
    `eval_routing: balanced` evaluates with the training assignment instead (flagged non-causal at
    evaluation), so a comparison can report both numbers.

    The selection bias is ignored while training: adding a per-expert constant adds the same amount to
    every balanced assignment's score, so it cannot change the optimum (bans are not honoured there
    either). At greedy evaluation it is added to the key.
    """

    EVAL_ROUTINGS = ("greedy", "balanced")
    causal_in_training = False
    config: BaseConfig

    @classmethod
    def causal_for(cls, config: BaseConfig, training: bool) -> bool:
        return not training and config.eval_routing == "greedy"

    def __init__(self, d_model: int, num_experts: int, config: BaseConfig):
        check_config(
            config.auction_epsilon > 0, f"router.auction_epsilon={config.auction_epsilon} must be > 0"
        )
        check_config(
            config.auction_phase_rounds >= 1,
            f"router.auction_phase_rounds={config.auction_phase_rounds} must be >= 1",
        )
        check_config(
            config.eval_routing in self.EVAL_ROUTINGS,
            f"router.eval_routing={config.eval_routing!r} must be one of {self.EVAL_ROUTINGS}",
        )
        super().__init__(d_model, num_experts, config)

    def route(self, x_ND, logits_NE, probs_NE, selection_bias_E) -> DispatchPlan:
        if self.training or self.config.eval_routing == "balanced":
            expert_N = balanced_assignment(
                logits_NE.detach(), self.config.auction_epsilon, self.config.auction_phase_rounds
            )
        else:
            expert_N = selection_key(logits_NE, selection_bias_E).argmax(-1)
        expert_N1 = expert_N[:, None]
        gate_N1 = logits_NE.gather(-1, expert_N1).sigmoid()
        return self.token_choice_plan(expert_N1, gate_N1, logits_NE, probs_NE)


def balanced_assignment(score_NE: torch.Tensor, epsilon: float, phase_rounds: int) -> torch.Tensor:
    """Expert per token maximising the total score with every expert holding ⌊N/E⌋ or ⌈N/E⌉ tokens.

    When E does not divide N, the N mod E spare slots go to the experts with the highest total score.
    """
    num_tokens, num_experts = score_NE.shape
    capacity_E = torch.full(
        (num_experts,), num_tokens // num_experts, dtype=torch.long, device=score_NE.device
    )
    spare = num_tokens % num_experts
    if spare:
        capacity_E[score_NE.sum(0).topk(spare).indices] += 1
    return auction(score_NE, capacity_E, epsilon, phase_rounds)


def auction(
    score_NE: torch.Tensor, capacity_E: torch.Tensor, epsilon: float, phase_rounds: int
) -> torch.Tensor:
    """Jacobi auction for the assignment with Σ capacity_E = N slots (Bertsekas 1988), ε-scaled.

    Every free token bids for its best expert, raising that expert's price by how much it prefers it to
    its next best option plus ε; an expert keeps as many of the highest bids as it has slots and frees
    the rest. Each token ends within ε of its best option at the final prices, so the total is within
    N·ε of the optimum (ε scaled by the score range). Phases with a coarse ε find rough prices in few
    rounds; each finer phase reassigns from scratch at those prices (ε-scaling), far faster than
    starting fine. Each round is a few vectorised ops.

    Nearly all tokens settle within a few dozen rounds; the last few can bounce for hundreds. So a
    phase stops after `phase_rounds`, and if the final one does, its few free tokens take the open
    slots greedily by score (the N·ε bound then holds for all other tokens).
    """
    num_tokens, num_experts = score_NE.shape
    if num_experts == 1:
        return score_NE.new_zeros(num_tokens, dtype=torch.long)
    score_range = max(float(score_NE.max() - score_NE.min()), 1e-6)
    price_E = score_NE.new_zeros(num_experts)
    for phase_epsilon in epsilon_schedule(epsilon):
        owner_N, bid_N = auction_phase(
            score_NE, price_E, capacity_E, phase_epsilon * score_range, phase_rounds
        )
        price_E = expert_prices(owner_N, bid_N, price_E, capacity_E)
    if bool((owner_N < 0).any()):
        log.debug(
            "auction phase ended with %d free tokens; they take the open slots greedily",
            int((owner_N < 0).sum()),
        )
        owner_N = fill_open_slots(score_NE, owner_N, capacity_E)
    return owner_N


def epsilon_schedule(final_epsilon: float, start: float = 0.1, shrink: float = 0.2) -> list[float]:
    """Coarse to fine: start, start·shrink, ... and finally `final_epsilon` (all as fractions of the range)."""
    schedule = [start]
    while schedule[-1] * shrink > final_epsilon * 1.5:
        schedule.append(schedule[-1] * shrink)
    return [*schedule, final_epsilon] if schedule[-1] > final_epsilon else schedule


def auction_phase(
    score_NE: torch.Tensor, reserve_E: torch.Tensor, capacity_E: torch.Tensor, epsilon: float, max_rounds: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign every token from scratch; an expert's price is its lowest kept bid once full, else `reserve_E`.

    Returns (owner_N, bid_N); owner -1 marks tokens still free after `max_rounds`.
    """
    num_tokens, num_experts = score_NE.shape
    owner_N = torch.full((num_tokens,), -1, dtype=torch.long, device=score_NE.device)
    bid_N = score_NE.new_zeros(num_tokens)
    for _ in range(max_rounds):
        free_U = (owner_N < 0).nonzero().squeeze(1)
        if free_U.numel() == 0:
            break
        price_E = expert_prices(owner_N, bid_N, reserve_E, capacity_E)
        top_values_U2, top_experts_U2 = (score_NE[free_U] - price_E).topk(2, dim=-1)
        best_U = top_experts_U2[:, 0]
        new_bid_U = price_E[best_U] + top_values_U2[:, 0] - top_values_U2[:, 1] + epsilon
        held_P = (owner_N >= 0).nonzero().squeeze(1)
        candidate_Q = torch.cat([held_P, free_U])
        expert_Q = torch.cat([owner_N[held_P], best_U])
        bid_Q = torch.cat([bid_N[held_P], new_bid_U])
        accept_highest(owner_N, bid_N, candidate_Q, expert_Q, bid_Q, capacity_E)
    return owner_N, bid_N


def accept_highest(
    owner_N: torch.Tensor,
    value_N: torch.Tensor,
    candidate_Q: torch.Tensor,
    expert_Q: torch.Tensor,
    value_Q: torch.Tensor,
    capacity_E: torch.Tensor,
) -> None:
    """Each expert keeps its highest-valued candidates up to its capacity; the rest become free (-1).
    Updates `owner_N` and `value_N` in place."""
    order_Q = torch.argsort(value_Q, descending=True, stable=True)
    candidate_Q, expert_Q, value_Q = candidate_Q[order_Q], expert_Q[order_Q], value_Q[order_Q]
    kept_Q = rank_within_bucket(expert_Q, capacity_E.numel()) < capacity_E[expert_Q]
    owner_N[candidate_Q] = torch.where(kept_Q, expert_Q, -1)
    value_N[candidate_Q] = value_Q


def expert_prices(
    owner_N: torch.Tensor, bid_N: torch.Tensor, reserve_E: torch.Tensor, capacity_E: torch.Tensor
) -> torch.Tensor:
    """A full expert costs its lowest kept bid (the slot a newcomer would take); others their reserve."""
    num_experts = reserve_E.numel()
    held_N = owner_N >= 0
    expert_P, bid_P = owner_N[held_N], bid_N[held_N]
    load_E = torch.bincount(expert_P, minlength=num_experts)
    lowest_bid_E = bid_N.new_full((num_experts,), float("inf")).scatter_reduce(0, expert_P, bid_P, "amin")
    return torch.where(load_E >= capacity_E, lowest_bid_E, reserve_E)


def fill_open_slots(score_NE: torch.Tensor, owner_N: torch.Tensor, capacity_E: torch.Tensor) -> torch.Tensor:
    """Free tokens propose to their best expert with room; experts take the best proposals that fit.
    Every round fills at least one slot, so it ends within E rounds."""
    owner_N, score_N = owner_N.clone(), score_NE.new_zeros(owner_N.shape)
    while bool((owner_N < 0).any()):
        free_U = (owner_N < 0).nonzero().squeeze(1)
        room_E = capacity_E - torch.bincount(owner_N[owner_N >= 0], minlength=capacity_E.numel())
        key_UE = score_NE[free_U].masked_fill(room_E <= 0, float("-inf"))
        best_score_U, best_U = key_UE.max(-1)
        accept_highest(owner_N, score_N, free_U, best_U, best_score_U, room_E)
    return owner_N
