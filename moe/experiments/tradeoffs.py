"""The `tradeoff` section of the results page: what a unit of quality costs in time and in money.

Per row (a routing policy): the final metric, the simulated throughput and the total compute cost (mean
± std over seeds), each against the `baseline` row (speed-up of throughput, percent change of the metric),
the verdict on a claim "throughput ≥ `speedup_at_least` × the baseline's at a metric within
`within_percent` %" for every other row, and a figure with two panels: the metric against simulated
wall time and against cost, one curve per row (mean over seeds), every run's final point, and the
Pareto front of those points (no other run is both faster, or cheaper, and better).

Curves join each logged value of the metric with the latest logged value of the time or cost key at or
before its step (both are cumulative; step 0 has spent nothing).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from moe.experiments.columns import is_number
from moe.experiments.comparison import JobRun, common_overrides, config_label
from moe.experiments.render import figure_link, markdown_table, mean_pm_std, pyplot, save_figure
from moe.experiments.sweeps import Sweep

Row = tuple[str, ...]


@dataclass
class TradeoffSpec:
    baseline: list[str] = field(default_factory=list)  # overrides naming the baseline row (all must match)
    metric: str = "val/loss"
    metric_label: str = "val loss"
    time_key: str = "perf/sim_seconds"  # cumulative simulated seconds (wall + virtual network time)
    time_label: str = "simulated time (s)"
    cost_key: str = "market/compute_cost"  # cumulative compute cost (the ledger's payments, paid + unpaid)
    cost_label: str = "compute cost (tokens)"
    throughput: str = "perf/sim_tokens_per_s"
    throughput_label: str = "simulated tokens/s"
    claim: str = ""  # the claim the verdict checks, in words
    speedup_at_least: float = 2.0
    within_percent: float = 2.0


@dataclass
class RowFinals:
    metric: list[float]
    throughput: list[float]
    cost: list[float]


def finals(runs: list[JobRun], spec: TradeoffSpec) -> RowFinals:
    """Each complete run's final metric, throughput and cost (summary.json, else the last logged value)."""

    def final(run: JobRun, key: str) -> float | None:
        value = (run.summary or {}).get(key)
        if is_number(value):
            return float(value)
        logged = [e[key] for e in run.events if is_number(e.get(key))]
        return float(logged[-1]) if logged else None

    complete = [run for run in runs if run.complete]
    return RowFinals(
        *(
            [v for run in complete if (v := final(run, key)) is not None]
            for key in (spec.metric, spec.throughput, spec.cost_key)
        )
    )


def baseline_row(rows: dict[Row, list[JobRun]], spec: TradeoffSpec) -> Row | None:
    matches = [row for row in rows if all(o in row for o in spec.baseline)]
    return matches[0] if len(matches) == 1 else None


def ratio_of_means(values: list[float], base: list[float]) -> float | None:
    if not values or not base or statistics.fmean(base) == 0:
        return None
    return statistics.fmean(values) / statistics.fmean(base)


def tradeoff_rows(rows: dict[Row, RowFinals], base: RowFinals | None, spec: TradeoffSpec, common) -> list:
    table = []
    for row, f in rows.items():
        speedup = ratio_of_means(f.throughput, base.throughput) if base else None
        metric_ratio = ratio_of_means(f.metric, base.metric) if base else None
        table.append(
            [
                config_label(row, common),
                mean_pm_std(f.metric, ".4f"),
                mean_pm_std(f.throughput, ".0f"),
                f"{speedup:.2f}×" if speedup is not None else "n/a",
                f"{100 * (metric_ratio - 1):+.2f} %" if metric_ratio is not None else "n/a",
                mean_pm_std(f.cost, ".2f"),
            ]
        )
    return table


def verdicts(rows: dict[Row, RowFinals], base_row: Row, spec: TradeoffSpec, common) -> list[str]:
    """For every row but the baseline: does it reach the speed-up at a metric within the tolerance?"""
    base = rows[base_row]
    lines = []
    for row, f in rows.items():
        speedup, metric_ratio = (
            ratio_of_means(f.throughput, base.throughput),
            ratio_of_means(f.metric, base.metric),
        )
        if row == base_row or speedup is None or metric_ratio is None:
            continue
        gap = 100 * (metric_ratio - 1)
        fast, close = speedup >= spec.speedup_at_least, gap <= spec.within_percent
        holds = "holds" if fast and close else "does NOT hold"
        why = [] if fast else [f"the speed-up is {speedup:.2f}×, short of {spec.speedup_at_least:g}×"]
        why += [] if close else [f"the {spec.metric_label} is {gap:+.2f} % from the baseline's"]
        because = f" ({'; '.join(why)})" if why else ""
        lines.append(
            f"- {config_label(row, common)}: {speedup:.2f}× the baseline's {spec.throughput_label} at "
            f"{gap:+.2f} % {spec.metric_label}: the claim {holds}{because}."
        )
    return lines


def tradeoff_section(sweep: Sweep, spec: TradeoffSpec, slug: str, figures: Path) -> list[str]:
    rows = {row: runs for row, runs in sweep.rows.items() if any(r.complete for r in runs)}
    if not rows:
        return []
    common = common_overrides(rows)
    by_row = {row: finals(runs, spec) for row, runs in rows.items()}
    base_row = baseline_row(rows, spec)
    base = by_row.get(base_row) if base_row is not None else None
    header = [
        "policy",
        f"final {spec.metric_label}",
        spec.throughput_label,
        "speed-up vs baseline",
        f"Δ {spec.metric_label} vs baseline",
        spec.cost_label,
    ]
    lines = ["", "### Quality against time and cost", ""]
    lines += [f"Baseline: {config_label(base_row, common) if base_row else 'none found'}", ""]
    lines += [*markdown_table(header, tradeoff_rows(by_row, base, spec, common), align="lrrrrr"), ""]
    if base_row is not None:
        claim = f"**Claim check** ({spec.claim}):" if spec.claim else "**Against the baseline:**"
        lines += [claim, "", *verdicts(by_row, base_row, spec, common), ""]
    png = figures / f"{slug}_tradeoff.png"
    if plot_tradeoff(rows, spec, common, png):
        lines += [figure_link(f"{slug} {spec.metric_label} against time and cost", png, figures.name), ""]
    return lines


# ---------------------------------------------------------------------------------------------- figure


def spent_curve(events: list[dict], metric: str, spent_key: str) -> list[tuple[float, float]]:
    """(spent, metric) at every logged metric value: the latest `spent_key` at or before its step."""
    spent, points = 0.0, []
    for event in sorted(events, key=lambda e: (e.get("step", 0), spent_key not in e)):
        if is_number(event.get(spent_key)):
            spent = float(event[spent_key])
        if is_number(event.get(metric)):
            points.append((spent, float(event[metric])))
    return points


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (lower is better on both), by the first axis."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def plot_tradeoff(rows: dict[Row, list[JobRun]], spec: TradeoffSpec, common, path: Path) -> bool:
    panels = [(spec.time_key, spec.time_label), (spec.cost_key, spec.cost_label)]
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4.5), squeeze=False)
    drawn = False
    for ax, (spent_key, xlabel) in zip(axes[0], panels, strict=True):
        finals_all = []
        for i, (row, runs) in enumerate(rows.items()):
            curves = [
                c for run in runs if run.complete and (c := spent_curve(run.events, spec.metric, spent_key))
            ]
            if not curves:
                continue
            colour = f"C{i}"
            length = min(len(c) for c in curves)
            xs = [statistics.fmean(c[j][0] for c in curves) for j in range(length)]
            ys = [statistics.fmean(c[j][1] for c in curves) for j in range(length)]
            ax.plot(xs, ys, color=colour, alpha=0.8, label=config_label(row, common))
            ax.scatter([c[-1][0] for c in curves], [c[-1][1] for c in curves], color=colour, s=18)
            finals_all += [c[-1] for c in curves]
            drawn = True
        front = pareto_front(finals_all)
        if front:
            ax.step([x for x, _ in front], [y for _, y in front], where="post", color="black", ls="--",
                    lw=1, label="Pareto front (runs)")  # fmt: skip
        ax.set(xlabel=xlabel, ylabel=spec.metric_label)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize="small")
    save_figure(fig, path)
    return drawn
