"""The compute market in a run (`market=...`): after every step, charge each provider for the rows its
experts computed, update the leases from the pools' failures, and move experts whose lease changed
hands. The lease book itself is `experts.market.LeaseBook`; this is the glue to a `Run`.

Legend: E experts.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from experts.market import ComputeCharge, LeaseBook, Move
from experts.market.offers import worker_name
from moe.nn.layer import MoELayer

if TYPE_CHECKING:
    from moe.engine.build import Run


def answered_counts_E(layer: MoELayer) -> torch.Tensor:
    """Rows each expert computed in the step's training call and answered (0 for failed experts)."""
    plan = layer.last_plan
    if plan is None:
        return torch.zeros(layer.pool.num_experts, dtype=torch.long)
    counts_E = plan.counts.detach().cpu().long()
    if layer.evidence is not None:
        answered_E = layer.evidence.answered_E.detach().cpu()
    else:
        answered_E = torch.ones_like(counts_E, dtype=torch.bool)
        answered_E[list(layer.pool.last_failures)] = False
    return counts_E * answered_E.long()


def measured_reply_ms(layers: list[MoELayer], market: LeaseBook) -> dict[str, float] | None:
    """Per provider, the mean measured reply time of its experts (ms), where pools measure one
    (`pool.reply_time_E`, seconds; NaN or 0 before a measurement); None when no pool measures."""
    times: dict[str, list[float]] = {}
    for layer in layers:
        reply_time_E = getattr(layer.pool, "reply_time_E", None)
        if reply_time_E is None:
            continue
        for e, seconds in enumerate(torch.as_tensor(reply_time_E).tolist()):
            if math.isfinite(seconds) and seconds > 0:
                times.setdefault(market.provider_of(layer.name, e).name, []).append(seconds * 1e3)
    return {name: sum(ms) / len(ms) for name, ms in times.items()} or None


def market_step(run: Run) -> list[ComputeCharge]:
    """The step's charges (at the prices of the leases the work was done under), then lease updates
    and moves."""
    market = run.market
    charges = [
        charge for layer in run.layers for charge in market.charges(layer.name, answered_counts_E(layer))
    ]
    failures = {layer.name: dict(layer.pool.last_failures) for layer in run.layers}
    moves = market.update(
        run.step,
        failures,
        alive=lambda provider: run.transport.host_alive(worker_name(provider)),
        measured_ms=measured_reply_ms(run.layers, market),
    )
    apply_moves(run.layers, moves)
    return charges


def apply_moves(layers: list[MoELayer], moves: list[Move]) -> None:
    by_name = {layer.name: layer for layer in layers}
    for move in moves:
        pool = by_name[move.layer].pool
        pool.move_expert(move.expert, move.link, move.host)
        pool.reply_times.forget(move.expert)  # measured afresh on its new host


def place_experts(layers: list[MoELayer], market: LeaseBook) -> None:
    """Put every expert where its lease says (after a resume: pools start from the initial auction)."""
    for layer in layers:
        links, hosts = market.placement(layer.name)
        for e, (link, host) in enumerate(zip(links, hosts, strict=True)):
            if layer.pool.hosts[e] != host:
                layer.pool.move_expert(e, link, host)


def restore_market(run: Run, state: dict) -> None:
    """The checkpoint's lease book, with every expert moved where its lease says (after the pools'
    state is loaded: a move carries it)."""
    if run.market is not None and state.get("market"):
        run.market.load_state_dict(state["market"])
        place_experts(run.layers, run.market)
