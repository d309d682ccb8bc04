"""The PoI section of a run report: per-expert scores, fidelity against Shapley, and their plots.

Read from the run's logged events (`poi/score|rank|load|failures/<layer>/<expert>` and
`poi/fidelity/<layer>/<scorer>`); empty when the run had no PoI scorer.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

from moe.experiments.render import figure_link, markdown_table, mean_pm_std, pyplot, save_figure

POI_SCORES_PLOT, POI_FIDELITY_PLOT = "poi_scores.png", "poi_fidelity.png"


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
    lines += [
        "Score = loss increase without the expert (EMA); rank 1 = most helpful; traffic = share of assignments.",
        "",
    ]
    for layer in sorted({k.split("/")[2] for k in last if k.startswith("poi/score/")}):
        lines += poi_layer_table(layer, last, behaviours)
    lines += fidelity_table([events])
    for figure in (
        plot_poi_scores(scored, out / POI_SCORES_PLOT),
        plot_fidelity(events, out / POI_FIDELITY_PLOT),
    ):
        if figure is not None:
            lines += ["", figure_link(figure.stem, figure)]
    return "\n".join(lines) + "\n"


def poi_layer_table(layer: str, event: dict, behaviours: dict[int, str]) -> list[str]:
    """One row per expert of the layer: behaviour, score, rank, traffic share and failures."""
    experts = sorted(int(k.rsplit("/", 1)[1]) for k in event if k.startswith(f"poi/score/{layer}/"))
    rows = []
    for e in experts:
        load = event.get(f"poi/load/{layer}/{e}")
        rows.append(
            [
                f"e{e}",
                behaviours.get(e, "honest"),
                f"{event[f'poi/score/{layer}/{e}']:+.4g}",
                str(event.get(f"poi/rank/{layer}/{e}", "")),
                "" if load is None else f"{load:.3f}",
                str(event.get(f"poi/failures/{layer}/{e}", 0)),
            ]
        )
    header = ["expert", "behaviour", "score", "rank", "traffic", "failures"]
    return [f"**{layer}**", "", *markdown_table(header, rows), ""]


def fidelity_points(events: list[dict]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(layer, scorer) → [(step, Spearman ρ against Shapley)] over training."""
    points: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for event in events:
        for key, value in event.items():
            if key.startswith("poi/fidelity/") and value is not None:
                _, _, layer, scorer = key.split("/")
                points[(layer, scorer)].append((event["step"], value))
    return points


def fidelity_values(runs_events: list[list[dict]], prefix: str) -> dict[tuple[str, str], list[float]]:
    """(layer, scorer) → each run's mean of `poi/<prefix>/<layer>/<scorer>` over its measurements."""
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for events in runs_events:
        per_key: dict[str, list[float]] = defaultdict(list)
        for event in events:
            for key, value in event.items():
                if (
                    key.startswith(f"poi/{prefix}/")
                    and isinstance(value, int | float)
                    and math.isfinite(value)
                ):
                    per_key[key].append(float(value))
        for key, measured in per_key.items():
            _, _, layer, scorer = key.split("/")
            values[(layer, scorer)].append(statistics.fmean(measured))
    return values


def mean_forwards(runs_events: list[list[dict]], scorer: str) -> float | None:
    key = f"poi/fidelity_forwards/{scorer}"
    counts = [float(e[key]) for events in runs_events for e in events if key in e]
    return statistics.fmean(counts) if counts else None


def fidelity_table(runs_events: list[list[dict]]) -> list[str]:
    """Scorers (best worst-layer ρ first) × Spearman ρ and Kendall τ against exact Shapley per layer (each
    run's mean over its measurements; over several runs mean ± std, and the minimum in brackets), and the
    forwards of one view against the reference's; empty when fidelity was never measured."""
    rho, tau = fidelity_values(runs_events, "fidelity"), fidelity_values(runs_events, "fidelity_kendall")
    if not rho:
        return []
    layers = sorted({layer for layer, _ in rho})
    scorers = sorted(
        {scorer for _, scorer in rho},
        key=lambda s: (
            -min(statistics.fmean(rho[(layer, s)]) for layer in layers if (layer, s) in rho),
            mean_forwards(runs_events, s) or 0.0,
        ),
    )
    reference = mean_forwards(runs_events, "reference")
    rows = []
    for scorer in scorers:
        forwards = mean_forwards(runs_events, scorer)
        rows.append(
            [
                scorer,
                *(spread(rho.get((layer, scorer), [])) for layer in layers),
                *(mean_pm_std(tau.get((layer, scorer), []), ".2f") for layer in layers),
                "n/a" if forwards is None else f"{forwards:.0f}",
                "n/a" if forwards is None or not reference else f"{100 * forwards / reference:.1f} %",
            ]
        )
    header = [
        "scorer",
        *(f"ρ {layer}" for layer in layers),
        *(f"τ {layer}" for layer in layers),
        "forwards",
        "% of reference",
    ]
    title = (
        f"Fidelity against exact Shapley values ({reference or 0:.0f} forwards per view; Monte-Carlo with "
        "`poi.fidelity_samples` permutations above 12 experts): Spearman ρ and Kendall τ, mean over measurements"
        + (f", then mean ± std (min) over {len(runs_events)} runs" if len(runs_events) > 1 else "")
        + "; forwards of one view over all layers."
    )
    return [title, "", *markdown_table(header, rows), ""]


def spread(values: list[float]) -> str:
    if len(values) <= 1:
        return mean_pm_std(values, ".3f")
    return f"{mean_pm_std(values, '.2f')} ({min(values):.2f})"


def plot_poi_scores(scored: list[dict], path: Path) -> Path:
    """Each expert's PoI score over training, one panel per MoE layer."""
    plt = pyplot()
    layers = sorted({k.split("/")[2] for e in scored for k in e if k.startswith("poi/score/")})
    fig, axes = plt.subplots(len(layers), 1, figsize=(7, 3 * len(layers)), squeeze=False)
    for ax, layer in zip(axes[:, 0], layers, strict=True):
        keys = sorted(
            {k for e in scored for k in e if k.startswith(f"poi/score/{layer}/")},
            key=lambda k: int(k.rsplit("/", 1)[1]),
        )
        for key in keys:
            points = [(e["step"], e[key]) for e in scored if e.get(key) is not None]
            ax.plot(*zip(*points, strict=True), label=f"e{key.rsplit('/', 1)[1]}")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_title(f"PoI score, {layer}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss increase without expert")
        ax.legend(ncol=4, fontsize="small")
        ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=120)


def plot_fidelity(events: list[dict], path: Path) -> Path | None:
    """Each scorer's Spearman ρ against Shapley over training; None when fidelity was never measured."""
    points = fidelity_points(events)
    if not points:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for (layer, scorer), series in sorted(points.items()):
        ax.plot(*zip(*series, strict=True), marker="o", label=f"{layer} {scorer}")
    ax.set_xlabel("step")
    ax.set_ylabel("Spearman ρ vs Shapley")
    ax.set_ylim(-1.05, 1.05)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=120)
