"""Glue between a training run and its reward ledger: who the miners are and what validators see.

Each MoE layer is a subnet whose miners are its experts. Validator 0 is the training run itself and
submits its running PoI scores; every other validator that needs a view measures one on its own
evaluation batch. Without a PoI scorer (`poi=null`) validators see each expert's gate mass.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch

from experts.behaviours import parse_behaviours
from moe.incentives.audits import as_audit_config
from moe.incentives.ledger import (
    LEDGER_FILE,
    TOKEN,
    LedgerConfig,
    RewardLedger,
    ScoreView,
    as_ledger_config,
)
from moe.incentives.ledger.audits import AuditPolicy

logger = logging.getLogger(__name__)


def open_run_ledger(
    run, resume_step: int | None, checkpoint_state: dict | None = None
) -> RewardLedger | None:
    """The run's ledger (`run_dir/ledger.sqlite`), or None when `ledger=null` or `ledger.enabled=false`;
    `checkpoint_state` is what the resumed checkpoint kept of it (`RewardLedger.checkpoint_state`)."""
    if run.cfg.get("ledger") is None or not run.cfg.ledger.enabled:
        return None
    for layer in run.layers:
        layer.record_evidence()  # the ledger needs each step's failures, with or without a PoI scorer
    return RewardLedger(
        Path(run.run_dir) / LEDGER_FILE,
        run_ledger_config(run.cfg),
        subnets=miner_labels(run),
        seed=run.cfg.seed,
        resume_step=resume_step,
        checkpoint_state=checkpoint_state,
        audit_policy=audit_policy(run.cfg.get("audit")),
    )


def run_ledger_config(cfg) -> LedgerConfig:
    """The run's ledger config; with a market (`market` group, issue 16) its `treasury` (tokens) funds
    the ledger's treasury, which pays for compute, in place of `ledger.treasury`."""
    ledger = as_ledger_config(cfg.ledger)
    market = cfg.get("market")
    if market is None or market.get("treasury") is None:
        return ledger
    if ledger.treasury and ledger.treasury != market.get("treasury"):
        logger.warning(
            "ledger.treasury=%s is replaced by market.treasury=%s", ledger.treasury, market.get("treasury")
        )
    return as_ledger_config({**dataclasses.asdict(ledger), "treasury": market.get("treasury")})


def audit_policy(cfg) -> AuditPolicy:
    """What a failed audit costs in the ledger: the run's `audit.slash` and `audit.ban_after`."""
    audit = as_audit_config(cfg)
    return AuditPolicy(slash=audit.slash, ban_after=audit.ban_after)


def miner_labels(run) -> dict[str, list[str]]:
    """Per layer, each expert's behaviour label (`honest`, `lazy`, ...), for reward-by-behaviour tables."""
    behaviours = parse_behaviours(run.cfg.experts.behaviours, run.cfg.experts.num)
    labels = [behaviours[e].kind if e in behaviours else "honest" for e in range(run.cfg.experts.num)]
    return {layer.name: list(labels) for layer in run.layers}


def score_view(run) -> ScoreView:
    """Validator v's view per layer: v = 0 is the run's EMA PoI (a fresh view, as the others take, until
    the scorer's first view: scorers that view every N steps have none before step N); others measure
    on their own batch."""
    cache: dict[int, dict[str, torch.Tensor]] = {}

    def view(validator: int) -> dict[str, torch.Tensor]:
        if validator not in cache:
            cache[validator] = _measure(run, validator)
        return cache[validator]

    return view


def _measure(run, validator: int) -> dict[str, torch.Tensor]:
    if run.scorer is None:
        return gate_mass_by_layer(run)
    if validator == 0 and run.scorer.has_views():
        return run.scorer.scores()
    batches = run.data.val_batches()
    return run.scorer.view(batches[validator % len(batches)], step=run.step)


def gate_mass_by_layer(run) -> dict[str, torch.Tensor]:
    """Per layer, each expert's gate mass summed over this step's assignments: the view validators
    fall back on without a PoI scorer (PoI's `gate` scorer averages it per token: `mean_gate_mass`)."""
    views = {}
    for layer in run.layers:
        plan = layer.last_plan
        views[layer.name] = torch.zeros(plan.num_experts).index_add(
            0, plan.expert_idx.cpu(), plan.gate.detach().float().cpu()
        )
    return views


def step_failures(run) -> dict[str, torch.Tensor]:
    """Per layer, 1 for each expert that failed to answer this step (timeouts, rejected outputs)."""
    failures = {}
    for layer in run.layers:
        evidence = layer.evidence
        answered_E = (
            evidence.answered_E
            if evidence is not None
            else torch.ones(layer.pool.num_experts, dtype=torch.bool)
        )
        failures[layer.name] = (~answered_E).long().cpu()
    return failures


def reward_metrics(rewards: dict) -> dict[str, float]:
    """`rewards/...` metrics from a ledger summary: issuance, balances by role and behaviour (tokens),
    the last epoch's consensus and incentive per miner and dividends per validator of every subnet, and
    the compute paid so far (`compute_metrics`: logged with the others, a cumulative cost series)."""
    metrics = {"rewards/issuance": rewards["issuance_tokens"], "rewards/blocks": rewards["blocks"]}
    metrics |= compute_metrics(rewards)
    for group in ("by_role", "by_behaviour"):
        for name, amount in rewards[group].items():
            metrics[f"rewards/balance/{name}"] = amount["tokens"]
    for subnet, epoch in rewards.get("last_epoch", {}).items():
        for key in ("consensus", "incentive", "dividends"):
            for uid, value in enumerate(epoch.get(key, [])):
                metrics[f"rewards/{key}/{subnet}/{uid}"] = value
    return metrics


def ledger_summary(ledger: RewardLedger) -> dict:
    """What summary.json keeps of the ledger: the reward summary (with the signed head, an anchor that
    `verify` checks) and the final `rewards/...` (and `market/...`) metrics, which sweep reports read
    like any other."""
    rewards = ledger.summary()
    return {"rewards": rewards, **reward_metrics(rewards)}


def compute_metrics(rewards: dict) -> dict[str, float]:
    """`market/compute_cost` (tokens charged for compute: paid + unpaid), `market/compute_paid`,
    `market/compute_unpaid`, the treasury's balance and per provider `market/compute_cost/<provider>`;
    empty when the ledger has neither a funded treasury nor a payment (no market)."""
    payments = rewards.get("payments") or {}
    if not payments.get("by_provider") and not payments.get("funded"):
        return {}
    metrics = {
        "market/compute_cost": (payments["paid"] + payments["unpaid"]) / TOKEN,
        "market/compute_paid": payments["paid"] / TOKEN,
        "market/compute_unpaid": payments["unpaid"] / TOKEN,
        "market/treasury": payments["treasury"] / TOKEN,
    }
    for provider, totals in payments["by_provider"].items():
        metrics[f"market/compute_cost/{provider}"] = (totals["paid"] + totals["unpaid"]) / TOKEN
        metrics[f"market/compute_tokens/{provider}"] = float(totals["tokens"])
    return metrics


def cost_per_bpb(compute_cost: float, bpb_start: float | None, bpb_end: float | None) -> float:
    """Compute tokens spent per bit/byte of val improvement: `compute_cost / (bpb_start − bpb_end)`.

    NaN when it has no meaning: either bits/byte is missing or NaN, or val bits/byte did not improve
    (the money bought no measurable improvement, so there is no price per unit of it)."""
    if bpb_start is None or bpb_end is None:
        return float("nan")
    improvement = float(bpb_start) - float(bpb_end)
    if not math.isfinite(improvement) or improvement <= 0:
        return float("nan")
    return float(compute_cost) / improvement
