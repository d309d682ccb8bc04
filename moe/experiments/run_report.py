"""The single-run report: `python eval.py ckpt=<run dir>` → `report.md` and its plots.

The checkpoint is rebuilt with every expert in this process, evaluated on the run's validation
batches, and reported with its loss per domain, per-expert load, the domain × expert routing table,
the training curves, the PoI and rewards sections when the run had them, and the text samples
`generate.*` made (`moe.experiments.generation`). Everything is written into the run dir (or `out`),
never into the source tree.

Legend: G domains, E experts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moe.engine.validation import evaluate
from moe.experiments.generation import samples_section
from moe.experiments.poi_report import poi_section
from moe.experiments.render import figure_link, markdown_table, pyplot, save_figure
from moe.experiments.rewards_report import rewards_section
from moe.experiments.trained import load_trained

REPORT_FILE = "report.md"
LOSS_CURVE_PLOT = "loss_curve.png"


def write_run_report(
    ckpt: str | Path, out_dir: str | Path | None = None, num_val_batches: int | None = None
) -> dict:
    """Evaluate the checkpoint and write `report.md` (+ plots) into `out_dir` (default: the run dir);
    returns the validation metrics and the report's path."""
    from moe.engine.metrics import METRICS_FILE, read_metrics

    run, state = load_trained(ckpt, num_val_batches)
    out = Path(out_dir) if out_dir else run.run_dir
    out.mkdir(parents=True, exist_ok=True)
    results = evaluate(
        run.model, run.data.val_batches(), run.data.domains, collect_routing=True, step=int(state["step"])
    )
    events = read_metrics(run.run_dir) if (run.run_dir / METRICS_FILE).exists() else []
    figures = [plot_train_val_loss(events, out / LOSS_CURVE_PLOT)] if events else []
    report = render_report(state["step"], run, results, figures)
    report += poi_section(events, run.cfg, out)
    report += "\n".join([*rewards_section(run.run_dir, out), *samples_section(out), ""])
    (out / REPORT_FILE).write_text(report)
    return {k: v for k, v in results.items() if not k.startswith("routing/")} | {
        "report": str(out / REPORT_FILE)
    }


def plot_train_val_loss(events: list[dict], path: Path) -> Path:
    """Train and validation loss against the step, from the run's logged events."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train/loss", "val/loss"):
        points = [(e["step"], e[key]) for e in events if e.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), label=key, marker="o" if key == "val/loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=120)


def render_report(step: int, run, results: dict, figures: list[Path]) -> str:
    """The report's header, validation table, routing sections and figure links."""
    lines = [f"# poimoe report: {run.run_dir}", "", f"Checkpoint step {step}.", "", "## Validation", ""]
    lines += validation_table(results, run.data.domains, byte_lm=run.model.task == "lm")
    for key, table_GE in ((k, v) for k, v in results.items() if k.startswith("routing/")):
        lines += routing_section(key.removeprefix("routing/"), table_GE, run.data.domains)
    for figure in figures:
        lines += ["", figure_link(figure.stem, figure)]
    return "\n".join(lines) + "\n"


def validation_table(results: dict, domains: list[str], *, byte_lm: bool) -> list[str]:
    """Loss (and bits per byte for byte LMs) overall and per domain."""
    rows = []
    for name in ["all", *domains]:
        prefix = "val" if name == "all" else f"val/{name}"
        if f"{prefix}/loss" in results:
            bpb = [f"{results[f'{prefix}/bpb']:.4f}"] if f"{prefix}/bpb" in results else []
            rows.append([name, f"{results[f'{prefix}/loss']:.4f}", *bpb])
    header = ["domain", "loss (nats)", "bits/byte"] if byte_lm else ["domain", "loss"]
    return markdown_table(header, rows)


def routing_section(layer: str, table_GE: torch.Tensor, domains: list[str]) -> list[str]:
    """Per-expert load and each domain's share of its assignments per expert, for one MoE layer."""
    load_E = table_GE.sum(0)
    share_E = load_E / load_E.sum().clamp_min(1)
    experts = [f"e{e}" for e in range(table_GE.shape[1])]
    lines = ["", f"## Routing, {layer}", "", "Per-expert load (share of assignments):", ""]
    lines += markdown_table(experts, [[f"{s:.3f}" for s in share_E.tolist()]])
    lines += ["", "Domain × expert (share of the domain's assignments):", ""]
    rows = []
    for g, domain in enumerate(domains):
        row_E = table_GE[g] / table_GE[g].sum().clamp_min(1)
        rows.append([domain, *(f"{v:.3f}" for v in row_E.tolist())])
    return lines + markdown_table(["domain", *experts], rows)
