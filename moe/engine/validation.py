"""Evaluation: validation metrics during training, and `eval.py` reports on finished runs.

Legend: B batch, T time, N tokens, E experts, G domains.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import defaultdict
from pathlib import Path

import torch

from moe.nn.model import MoEModel

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

    With `collect_routing`, also returns `routing/<layer>` → a [G, E] tensor counting how often
    tokens of each domain were sent to each expert (the domain × expert table of the report).
    """
    was_training = model.training
    model.eval()
    loss_sum_G = torch.zeros(len(domains), dtype=torch.float64)
    count_G = torch.zeros(len(domains), dtype=torch.float64)
    routing: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(len(domains), 0))
    try:
        for batch in batches:
            with autocast():
                pred, _ = model(batch.inputs, step=step)
            loss_B = model.loss_per_example(pred, batch.targets).double().cpu()
            domain_B = batch.domain_B.cpu()
            loss_sum_G.index_add_(0, domain_B, loss_B)
            count_G.index_add_(0, domain_B, torch.ones_like(loss_B))
            if collect_routing:
                _count_routing(model, domain_B, routing)
    finally:
        model.train(was_training)
    results = _loss_metrics(loss_sum_G, count_G, domains, byte_lm=model.task == "lm")
    if collect_routing:
        results.update({f"routing/{name}": table for name, table in routing.items()})
    return results


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
        flat = torch.bincount(domain_A * num_experts + plan.expert_idx.cpu(), minlength=num_domains * num_experts)
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


# ---------------------------------------------------------------- eval.py: reports on finished runs


def main(cfg) -> dict:
    """`eval.py ckpt=<run>` → report.md + plots; `eval.py compare=<multirun dir>` → comparison.md;
    `eval.py report=<folder of sweeps>` → docs/results.md + docs/figures/ (or under `out`)."""
    from moe.errors import ConfigError

    if cfg.report:
        from moe.experiments.results_page import write_results_page

        return {"results": str(write_results_page(Path(cfg.report), Path(cfg.out) if cfg.out else None))}
    if cfg.compare:
        from moe.experiments.comparison import compare_sweep

        return {"comparison": str(compare_sweep(Path(cfg.compare)))}
    if not cfg.ckpt:
        raise ConfigError("nothing to evaluate: pass ckpt=<run dir or checkpoint file> (or compare=<multirun dir>)")
    return write_run_report(cfg.ckpt, out_dir=cfg.out, num_val_batches=cfg.num_val_batches)


def load_trained(ckpt: str | Path, num_val_batches: int | None = None):
    """Rebuild a run's data and model from a checkpoint, with its experts in this process."""
    from omegaconf import OmegaConf

    from moe.engine.checkpoint import load_checkpoint, run_dir_of
    from moe.engine.loop import build_run

    path, state = load_checkpoint(ckpt)
    cfg = OmegaConf.create(state["config"])
    cfg.transport = {"name": "local"}  # a report needs no workers: the checkpoint holds every expert
    cfg.trainer.device = "cpu"
    if num_val_batches is not None:
        cfg.data.num_val_batches = num_val_batches
    run = build_run(cfg, run_dir_of(path))
    model = run.accelerator.unwrap_model(run.model)
    model.load_state_dict(state["model"])
    for layer in model.moe_layers():
        layer.pool.load_state_dict(state["pools"][layer.name])
    return run, state


def write_run_report(ckpt: str | Path, out_dir: str | Path | None = None, num_val_batches: int | None = None) -> dict:
    from moe.engine.metrics import read_metrics
    from moe.incentives.rewards import rewards_section

    run, state = load_trained(ckpt, num_val_batches)
    out = Path(out_dir) if out_dir else run.run_dir
    out.mkdir(parents=True, exist_ok=True)
    results = evaluate(run.model, run.data.val_batches(), run.data.domains, collect_routing=True, step=int(state["step"]))
    events = read_metrics(run.run_dir) if (run.run_dir / "metrics.jsonl").exists() else []
    figures = [plot_curves(events, out / "loss_curve.png")] if events else []
    report = render_report(state["step"], run, results, figures)
    report += poi_section(events, run.cfg, out)
    report += "\n".join([*rewards_section(run.run_dir, out), ""])
    (out / "report.md").write_text(report)
    return {k: v for k, v in results.items() if not k.startswith("routing/")} | {"report": str(out / "report.md")}


def plot_curves(events: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train/loss", "val/loss"):
        points = [(e["step"], e[key]) for e in events if e.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), label=key, marker="o" if key == "val/loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render_report(step: int, run, results: dict, figures: list[Path]) -> str:
    domains = run.data.domains
    lines = [f"# poimoe report: {run.run_dir}", "", f"Checkpoint step {step}.", "", "## Validation", ""]
    lines += ["| domain | loss (nats) | bits/byte |" if run.model.task == "lm" else "| domain | loss |", ""]
    lines[-1] = "|---|---|---|" if run.model.task == "lm" else "|---|---|"
    for name in ["all", *domains]:
        prefix = "val" if name == "all" else f"val/{name}"
        if f"{prefix}/loss" in results:
            bpb = f" {results[f'{prefix}/bpb']:.4f} |" if f"{prefix}/bpb" in results else ""
            lines.append(f"| {name} | {results[f'{prefix}/loss']:.4f} |{bpb}")
    for key, table_GE in ((k, v) for k, v in results.items() if k.startswith("routing/")):
        lines += routing_section(key.removeprefix("routing/"), table_GE, domains)
    for figure in figures:
        lines += ["", f"![{figure.stem}]({figure.name})"]
    return "\n".join(lines) + "\n"


def routing_section(layer: str, table_GE: torch.Tensor, domains: list[str]) -> list[str]:
    load_E = table_GE.sum(0)
    share_E = load_E / load_E.sum().clamp_min(1)
    experts = range(table_GE.shape[1])
    lines = ["", f"## Routing, {layer}", "", "Per-expert load (share of assignments):", ""]
    lines += ["| " + " | ".join(f"e{e}" for e in experts) + " |", "|" + "---|" * len(experts)]
    lines.append("| " + " | ".join(f"{s:.3f}" for s in share_E.tolist()) + " |")
    lines += ["", "Domain × expert (share of the domain's assignments):", ""]
    lines += ["| domain | " + " | ".join(f"e{e}" for e in experts) + " |", "|---|" + "---|" * len(experts)]
    for g, domain in enumerate(domains):
        row = table_GE[g] / table_GE[g].sum().clamp_min(1)
        lines.append(f"| {domain} | " + " | ".join(f"{v:.3f}" for v in row.tolist()) + " |")
    return lines


# ---------------------------------------------------------------- the PoI section of a run report


def poi_section(events: list[dict], cfg, out: Path) -> str:
    """Per-expert PoI per layer (from the last logged scores), behaviours where configured, fidelity
    against Shapley where measured, and plots of both over training; empty when PoI was off."""
    scored = [e for e in events if any(k.startswith("poi/score/") for k in e)]
    if not scored:
        return ""
    last = scored[-1]
    behaviours = {int(k): str(v) for k, v in ((cfg.experts.get("behaviours") or {}).items())}
    scorer = (cfg.get("poi") or {}).get("name", "?")
    lines = ["", f"## Proof of Intelligence ({scorer}, step {last['step']})", ""]
    lines += ["Score = loss increase without the expert (EMA); rank 1 = most helpful; traffic = share of assignments.", ""]
    for layer in sorted({k.split("/")[2] for k in last if k.startswith("poi/score/")}):
        lines += _poi_layer_table(layer, last, behaviours)
    lines += _fidelity_table(events)
    for figure in (_plot_poi_scores(scored, out / "poi_scores.png"), _plot_fidelity(events, out / "poi_fidelity.png")):
        if figure is not None:
            lines += ["", f"![{figure.stem}]({figure.name})"]
    return "\n".join(lines) + "\n"


def _poi_layer_table(layer: str, event: dict, behaviours: dict[int, str]) -> list[str]:
    experts = sorted(int(k.rsplit("/", 1)[1]) for k in event if k.startswith(f"poi/score/{layer}/"))
    lines = [f"**{layer}**", "", "| expert | behaviour | score | rank | traffic | failures |", "|---|---|---|---|---|---|"]
    for e in experts:
        load = event.get(f"poi/load/{layer}/{e}")
        lines.append(
            f"| e{e} | {behaviours.get(e, 'honest')} | {event[f'poi/score/{layer}/{e}']:+.4g} "
            f"| {event.get(f'poi/rank/{layer}/{e}', '')} | {'' if load is None else f'{load:.3f}'} "
            f"| {event.get(f'poi/failures/{layer}/{e}', 0)} |"
        )
    return [*lines, ""]


def _fidelity_points(events: list[dict]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    points: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for event in events:
        for key, value in event.items():
            if key.startswith("poi/fidelity/") and value is not None:
                _, _, layer, scorer = key.split("/")
                points[(layer, scorer)].append((event["step"], value))
    return points


def _fidelity_table(events: list[dict]) -> list[str]:
    points = _fidelity_points(events)
    if not points:
        return []
    scorers = sorted({scorer for _, scorer in points})
    lines = ["Fidelity: Spearman ρ against Monte-Carlo Shapley values (last measurement; mean over measurements).", ""]
    lines += ["| layer | " + " | ".join(scorers) + " |", "|---|" + "---|" * len(scorers)]
    for layer in sorted({layer for layer, _ in points}):
        cells = []
        for scorer in scorers:
            series = [v for _, v in points.get((layer, scorer), [])]
            cells.append(f"{series[-1]:.3f} ({sum(series) / len(series):.3f})" if series else "")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _plot_poi_scores(scored: list[dict], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({k.split("/")[2] for e in scored for k in e if k.startswith("poi/score/")})
    fig, axes = plt.subplots(len(layers), 1, figsize=(7, 3 * len(layers)), squeeze=False)
    for ax, layer in zip(axes[:, 0], layers, strict=True):
        keys = sorted({k for e in scored for k in e if k.startswith(f"poi/score/{layer}/")}, key=lambda k: int(k.rsplit("/", 1)[1]))
        for key in keys:
            points = [(e["step"], e[key]) for e in scored if e.get(key) is not None]
            ax.plot(*zip(*points, strict=True), label=f"e{key.rsplit('/', 1)[1]}")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_title(f"PoI score, {layer}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss increase without expert")
        ax.legend(ncol=4, fontsize="small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_fidelity(events: list[dict], path: Path) -> Path | None:
    points = _fidelity_points(events)
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (layer, scorer), series in sorted(points.items()):
        ax.plot(*zip(*series, strict=True), marker="o", label=f"{layer} {scorer}")
    ax.set_xlabel("step")
    ax.set_ylabel("Spearman ρ vs Shapley")
    ax.set_ylim(-1.05, 1.05)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
