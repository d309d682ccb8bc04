"""Validation during training: loss per domain, each layer's load balance pooled over the whole
validation set in evaluation mode, domain × expert routing counts and their mutual information, and the
routing tables file reports read later (reports live in `moe.experiments`).

Legend: B batch, T time, N tokens, A token-expert assignments, E experts, G domains.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import defaultdict
from pathlib import Path

import torch

from moe.nn.model import MoEModel
from router.plan import DispatchPlan, routing_metrics

LN2 = math.log(2.0)
ROUTING_TABLES_FILE = "routing_tables.json"


@torch.no_grad()
def evaluate(
    model: MoEModel,
    batches: list,
    domains: list[str],
    *,
    autocast=contextlib.nullcontext,
    collect_routing: bool = False,
    step: int = 0,
) -> dict:
    """Validation loss (and bits-per-byte for byte LMs) overall and per domain, as the experts answer at
    training step `step`.

    Per layer, `val/router/<layer>/{load_cv,max_vio,dropped_frac,first_choice_max_vio}` describe the load
    pooled over every validation batch, as evaluation routes: what the val loss was measured with (the
    training-batch `router/...` series is one batch, after drops, in training-mode routing).
    With `collect_routing`, also returns `routing/<layer>` → a [G, E] tensor counting how often
    tokens of each domain were sent to each expert (the domain × expert table of the report).
    """
    was_training = model.training
    model.eval()
    loss_sum_G = torch.zeros(len(domains), dtype=torch.float64)
    count_G = torch.zeros(len(domains), dtype=torch.float64)
    routing: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(len(domains), 0))
    load = {layer.name: PooledLoad(layer.pool.num_experts) for layer in model.moe_layers()}
    try:
        for batch in batches:
            with autocast():
                pred, _ = model(batch.inputs, step=step)
            loss_B = model.loss_per_example(pred, batch.targets).double().cpu()
            domain_B = batch.domain_B.cpu()
            loss_sum_G.index_add_(0, domain_B, loss_B)
            count_G.index_add_(0, domain_B, torch.ones_like(loss_B))
            for layer in model.moe_layers():
                load[layer.name].add(layer.last_plan)
            if collect_routing:
                _count_routing(model, domain_B, routing)
    finally:
        model.train(was_training)
    results = _loss_metrics(loss_sum_G, count_G, domains, byte_lm=model.task == "lm")
    for name, pooled in load.items():
        results.update({f"val/router/{name}/{key}": value for key, value in pooled.metrics().items()})
    if collect_routing:
        results.update({f"routing/{name}": table for name, table in routing.items()})
    return results


class PooledLoad:
    """One layer's assignments, drops and first choices summed over validation batches."""

    def __init__(self, num_experts: int):
        self.counts_E = torch.zeros(num_experts, dtype=torch.long)
        self.first_choice_E: torch.Tensor | None = torch.zeros(num_experts, dtype=torch.long)
        self.dropped = 0

    def add(self, plan: DispatchPlan) -> None:
        self.counts_E += plan.counts.cpu()
        self.dropped += plan.dropped.numel()
        if plan.first_choice_counts is None or self.first_choice_E is None:
            self.first_choice_E = None  # the strategy has no per-token first choice
        else:
            self.first_choice_E += plan.first_choice_counts.cpu()

    def metrics(self) -> dict[str, float]:
        pooled = routing_metrics(self.counts_E, self.dropped, first_choice_E=self.first_choice_E)
        keys = ("load_cv", "max_vio", "dropped_frac", "first_choice_max_vio")
        return {key: float(pooled[key]) for key in keys if key in pooled}


def _loss_metrics(loss_sum_G, count_G, domains, *, byte_lm: bool) -> dict[str, float]:
    results = {"val/loss": float(loss_sum_G.sum() / count_G.sum().clamp_min(1))}
    for g, domain in enumerate(domains):
        if count_G[g] > 0:
            results[f"val/{domain}/loss"] = float(loss_sum_G[g] / count_G[g])
    if byte_lm:  # one token per byte, so nats per token / ln 2 = bits per byte
        results.update({k.replace("/loss", "/bpb"): v / LN2 for k, v in list(results.items())})
    return results


def _count_routing(model: MoEModel, domain_B: torch.Tensor, routing: dict) -> None:
    for layer in model.moe_layers():
        plan = layer.last_plan
        tokens_per_example = plan.num_tokens // domain_B.numel()
        domain_N = domain_B.repeat_interleave(tokens_per_example)
        domain_A = domain_N[plan.token_idx.cpu()]
        num_domains, num_experts = routing[layer.name].shape[0], plan.num_experts
        flat = torch.bincount(
            domain_A * num_experts + plan.expert_idx.cpu(), minlength=num_domains * num_experts
        )
        table_GE = flat.reshape(num_domains, num_experts).double()
        previous = routing[layer.name]
        routing[layer.name] = table_GE if previous.numel() == 0 else previous + table_GE


def routing_mutual_information(table_GE: torch.Tensor) -> float:
    """Mutual information (bits) between domain and chosen expert, from a domain × expert count table.

    0 when routing ignores the domain; log2(min(G, E)) when every domain has experts of its own (the
    most a G × E table can hold). A learned router that specialises by domain lands in between.
    """
    joint_GE = table_GE.double() / table_GE.sum().clamp_min(1e-12)
    outer_GE = joint_GE.sum(1, keepdim=True) * joint_GE.sum(0, keepdim=True)
    used = joint_GE > 0
    return float((joint_GE[used] * torch.log2(joint_GE[used] / outer_GE[used])).sum())


def specialisation_metrics(tables: dict[str, torch.Tensor]) -> dict[str, float]:
    """`routing/<layer>/domain_mi` for each layer's domain × expert table."""
    return {f"routing/{layer}/domain_mi": routing_mutual_information(t) for layer, t in tables.items()}


def write_routing_tables(run_dir: Path, tables: dict[str, torch.Tensor], domains: list[str]) -> Path:
    """Keep the final domain × expert counts in the run dir, so reports draw heatmaps without retraining."""
    path = Path(run_dir) / ROUTING_TABLES_FILE
    content = {"domains": list(domains), "layers": {layer: t.tolist() for layer, t in tables.items()}}
    path.write_text(json.dumps(content))
    return path


def read_routing_tables(run_dir: Path) -> tuple[list[str], dict[str, torch.Tensor]] | None:
    """(domains, {layer: [G, E] counts}) as `write_routing_tables` left them; None when absent."""
    path = Path(run_dir) / ROUTING_TABLES_FILE
    if not path.exists():
        return None
    content = json.loads(path.read_text())
    tables = {layer: torch.tensor(rows, dtype=torch.float64) for layer, rows in content["layers"].items()}
    return content["domains"], tables
