"""The special sections an experiment's `report:` block can ask for (see `moe.experiments.page_spec`).

- `gap_grid`: a final metric over a grid of two config keys (a factor and a `by` key), each cell
  against the factor's baseline cell of the same `by` value (means, and paired by seed), with the
  verdict on a claim "at factor = x the metric stays within y % of the baseline".
- `routing_heatmaps`: the domain × expert routing tables each row's run kept (routing_tables.json),
  one panel per row, with the mutual information between domain and expert.
- `fidelity_table`: per row and PoI scorer, Spearman ρ and Kendall τ against exact Shapley values per
  layer (each run's mean over its measurements; mean ± std and minimum over seeds) and the forward
  passes of one view (`poi/fidelity*` metrics of `poi.fidelity_every`).

Legend: G domains, E experts.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch

from moe.engine.validation import read_routing_tables, routing_mutual_information
from moe.experiments.columns import is_number, natural_key
from moe.experiments.comparison import split_override
from moe.experiments.page_spec import GapGridSpec, HeatmapSpec
from moe.experiments.poi_report import fidelity_table
from moe.experiments.render import figure_link, markdown_table, mean_pm_std, pyplot, save_figure
from moe.experiments.sweeps import Sweep, dotted_get

Cells = dict[tuple[float, float], list[float]]  # (factor value, by value) → one value per seed

# ---------------------------------------------------------------------------------------------- gap grid


def cell_values(sweep: Sweep, grid: GapGridSpec, key: str) -> dict[tuple[float, float], dict[str, float]]:
    """(factor value, by value) → seed → the final `key` of that seed's completed run."""
    cells: dict[tuple[float, float], dict[str, float]] = {}
    for run in sweep.runs:
        config = sweep.configs.get(run.job)
        if not run.complete or config is None or not is_number(run.summary.get(key)):
            continue
        cell = (float(dotted_get(config, grid.factor) or 0.0), float(dotted_get(config, grid.by) or 0.0))
        cells.setdefault(cell, {})[str(config.get("seed"))] = float(run.summary[key])
    return cells


def percent_gap(values: list[float], base: list[float]) -> float:
    """How far the mean of `values` is above the mean of `base`, in percent."""
    return 100 * (statistics.fmean(values) / statistics.fmean(base) - 1)


def paired_gaps(by_seed: dict[str, float], base_by_seed: dict[str, float]) -> list[float]:
    """Percent change against the baseline run of the same seed (same data order and init)."""
    return [100 * (v / base_by_seed[seed] - 1) for seed, v in sorted(by_seed.items()) if seed in base_by_seed]


def labels(grid: GapGridSpec) -> tuple[str, str]:
    """How the section names the factor and the `by` key."""
    return grid.factor_label or grid.factor, grid.by_label or grid.by


def gap_grid_section(sweep: Sweep, grid: GapGridSpec, slug: str, figures: Path) -> list[str]:
    """The metric of every cell against its baseline cell, the claim's verdict, and a plot."""
    factor, by = labels(grid)
    by_seed = cell_values(sweep, grid, grid.metric)
    cells = per_cell(by_seed)
    header = [
        factor,
        f"{by} {grid.by_unit}".strip(),
        grid.metric_label,
        f"Δ vs {factor} {grid.baseline:g} (means)",
        "Δ paired by seed",
    ]
    title = (
        f"**Claim check** ({grid.claim}; tolerance {grid.within_percent:g} %):"
        if grid.claim
        else f"**{grid.metric_label} against {factor} {grid.baseline:g}:**"
    )
    lines = [title, "", *markdown_table(header, gap_rows(by_seed, grid), align="rrrrr"), ""]
    if grid.claim_at is not None:
        lines += [verdict(cells, grid), ""]
    if grid.note and len({y for _, y in cells}) > 1:
        lines += [grid.note.strip(), ""]
    png = figures / f"{slug}_gap_grid.png"
    throughput = per_cell(cell_values(sweep, grid, grid.throughput)) if grid.throughput else {}
    if plot_gap_grid(cells, throughput, grid, png):
        lines += [figure_link(f"{slug} {grid.metric_label} vs {factor}", png, figures.name), ""]
    return lines


def per_cell(by_seed: dict[tuple[float, float], dict[str, float]]) -> Cells:
    return {cell: list(values.values()) for cell, values in by_seed.items()}


def gap_rows(by_seed: dict[tuple[float, float], dict[str, float]], grid: GapGridSpec) -> list[list[str]]:
    """Per cell: its value (mean ± std over seeds), the gap of the means and the gaps paired by seed."""
    cells = per_cell(by_seed)
    rows = []
    for (x, y), values in sorted(cells.items()):
        base = cells.get((grid.baseline, y))
        paired = paired_gaps(by_seed[(x, y)], by_seed.get((grid.baseline, y), {}))
        gap = f"{percent_gap(values, base):+.2f} %" if base else "n/a"
        rows.append(
            [
                f"{x:g}",
                f"{y:g}",
                mean_pm_std(values, ".4f"),
                gap,
                ", ".join(f"{g:+.2f} %" for g in paired) or "n/a",
            ]
        )
    return rows


def verdict(cells: Cells, grid: GapGridSpec) -> str:
    """The claim's verdict from the cells at `claim_at`, next to the seed spread that limits what it can show."""
    factor, by = labels(grid)
    gaps, spreads = [], []
    for (x, y), values in cells.items():
        base = cells.get((grid.baseline, y))
        if x == grid.claim_at and base:
            gaps.append(percent_gap(values, base))
            if len(base) > 1:
                spreads.append(100 * statistics.stdev(base) / statistics.fmean(base))
    at, baseline = f"{factor} {grid.claim_at:g}", f"{factor} {grid.baseline:g}"
    if not gaps:
        return f"Verdict: not testable from these runs (no {at} cell with a {baseline} baseline)."
    worst = max(gaps)
    holds = "holds" if worst <= grid.within_percent else "does NOT hold"
    spread = f" At {baseline} it varies by {max(spreads):.2f} % (std) across seeds." if spreads else ""
    return (
        f"Verdict at this scale: at {at} the {grid.metric_label} is {worst:+.2f} % from its value at "
        f"{baseline} (worst {by} cell): the claim {holds}.{spread}"
    )


def plot_gap_grid(metric: Cells, throughput: Cells, grid: GapGridSpec, path: Path) -> bool:
    """The metric (and the throughput, log scale, when given) against the factor, one line per `by` value."""
    if not metric:
        return False
    factor, by = labels(grid)
    panels = [(metric, f"final {grid.metric_label}", "linear")]
    if throughput:
        panels.append((throughput, grid.throughput_label or grid.throughput, "log"))
    fig, axes = pyplot().subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (cells, ylabel, yscale) in zip(axes[0], panels, strict=True):
        for y in sorted({y for _, y in cells}):
            points = sorted((x, values) for (x, y_), values in cells.items() if y_ == y)
            ax.errorbar(
                [x for x, _ in points],
                [statistics.fmean(v) for _, v in points],
                yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points],
                marker="o",
                capsize=3,
                label=f"{by} {y:g} {grid.by_unit}".strip(),
            )
        ax.set(xlabel=factor, ylabel=ylabel, yscale=yscale)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)
    return True


# ---------------------------------------------------------------------------------------------- heatmaps


def routing_tables_by_row(
    sweep: Sweep, spec: HeatmapSpec
) -> tuple[list[str], dict[str, dict[str, torch.Tensor]]]:
    """(domains, row label → layer → [G, E] counts) from each row's lowest seed. Seeds are not summed:
    expert indices mean nothing across seeds, so a sum would blur the specialisation it should show."""
    domains: list[str] = []
    by_row: dict[str, dict[str, torch.Tensor]] = {}
    for config, runs in sweep.rows.items():
        for run in sorted(runs, key=lambda r: natural_key(r.seed)):
            found = read_routing_tables(sweep.job_dir(run))
            if found is not None:
                domains, tables = found
                by_row[f"{panel_label(config, spec)} (seed {run.seed})"] = tables
                break
    return domains, by_row


def panel_label(config: tuple[str, ...], spec: HeatmapSpec) -> str:
    """The row's `panel_key` value when its overrides set it, else its overrides."""
    value = next((v for k, v in map(split_override, config) if k == spec.panel_key), None)
    return value or ", ".join(config) or "(defaults)"


def routing_heatmaps_section(sweep: Sweep, spec: HeatmapSpec, slug: str, figures: Path) -> list[str]:
    domains, by_row = routing_tables_by_row(sweep, spec)
    if not by_row:
        return ["No routing_tables.json in this sweep's jobs: no heatmaps.", ""]
    layers = sorted({layer for tables in by_row.values() for layer in tables}, key=natural_key)
    num_experts = max(t.shape[1] for tables in by_row.values() for t in tables.values())
    bound = math.log2(min(len(domains), num_experts))
    lines = [
        "Domain × expert heatmaps (one seed per row; the MI columns above average the per-seed MI). "
        f"MI is in bits: 0 = routing ignores the domain, {bound:.0f} = every domain has experts of its own.",
        "",
    ]
    for layer in layers:
        png = figures / f"{slug}_heatmap_{layer}.png"
        plot_heatmaps({label: t[layer] for label, t in by_row.items() if layer in t}, domains, layer, png)
        lines += [figure_link(f"{slug} domain × expert, {layer}", png, figures.name), ""]
    return lines


def plot_heatmaps(tables: dict[str, torch.Tensor], domains: list[str], layer: str, path: Path) -> Path:
    """One panel per row: each domain's share of its assignments per expert, on one colour scale."""
    shares = {label: t / t.sum(1, keepdim=True).clamp_min(1) for label, t in tables.items()}
    vmax = max(float(s.max()) for s in shares.values()) or 1.0
    cols = min(3, len(tables))
    rows = math.ceil(len(tables) / cols)
    fig, axes = pyplot().subplots(
        rows, cols, figsize=(3.6 * cols + 1, 2.4 * rows + 0.6), squeeze=False, layout="constrained"
    )
    image = None
    for i, (ax, (label, share_GE)) in enumerate(zip(axes.flat, shares.items(), strict=False)):
        image = ax.imshow(share_GE.numpy(), vmin=0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_title(f"{label}: MI {routing_mutual_information(tables[label]):.2f} bits", fontsize="small")
        ax.set_yticks(range(len(domains)), domains if i % cols == 0 else [], fontsize="small")
        ax.set_xticks(range(share_GE.shape[1]))
        ax.set_xlabel("expert", fontsize="small")
    for ax in list(axes.flat)[len(tables) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="share of the domain's assignments")
    fig.suptitle(f"domain × expert, {layer}")
    return save_figure(fig, path, tight=False)


# ---------------------------------------------------------------------------------------------- PoI fidelity


def fidelity_section(sweep: Sweep) -> list[str]:
    """One fidelity table (`poi_report.fidelity_table`) per row, over its completed seeds."""
    lines = []
    for row, runs in sweep.rows.items():
        table = fidelity_table([run.events for run in runs if run.complete])
        if table:
            lines += [f"**{' '.join(row) or 'all runs'}**", "", *table]
    return ["", "### PoI fidelity against exact Shapley values", "", *lines] if lines else []
