"""The `detection` section of the results page: how often, and how soon, audits catch a dishonest miner,
per behaviour (the `by` key) and audit rate (the `factor` key), over seeds; the honest miners' false
positives; and a figure of detection against the audit rate per behaviour.

Read from each run's logged cumulative tallies (`audits/<layer>/<expert>/{run,failed}`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from moe.experiments.columns import natural_key
from moe.experiments.render import figure_link, markdown_table, pyplot, save_figure
from moe.experiments.sweeps import Sweep, dotted_get


@dataclass
class DetectionSpec:
    factor: str  # config key of the audit rate (e.g. audit.rate)
    by: str  # config key naming the dishonest behaviour of a row (e.g. experts.behaviours)
    failed_key: str  # the dishonest expert's cumulative failed audits (e.g. audits/layer0/1/failed)
    honest_prefixes: list[str] = field(
        default_factory=list
    )  # e.g. [audits/layer0/0/]: honest experts' tallies
    within: int = 0  # caught "within N steps" (0: the whole run)


@dataclass
class RunDetection:
    caught: bool
    first_step: int | None


def run_detection(events: list[dict], spec: DetectionSpec) -> RunDetection:
    caught_at = [
        int(e["step"])
        for e in events
        if float(e.get(spec.failed_key) or 0) > 0 and (not spec.within or int(e["step"]) <= spec.within)
    ]
    return RunDetection(bool(caught_at), min(caught_at) if caught_at else None)


def honest_tallies(events: list[dict], prefixes: list[str]) -> tuple[float, float]:
    """(failed, run) audits of the honest experts at the run's last logged tallies."""
    last: dict[str, float] = {}
    for event in events:
        for key, value in event.items():
            if any(key.startswith(p) for p in prefixes) and key.rsplit("/", 1)[-1] in ("failed", "run"):
                last[key] = float(value)
    failed = sum(v for k, v in last.items() if k.endswith("/failed"))
    return failed, sum(v for k, v in last.items() if k.endswith("/run"))


def row_label(value) -> str:
    """A row's `by` value as the page names it: a one-entry mapping (expert → behaviour) by its value."""
    if isinstance(value, dict) and len(value) == 1:
        return str(next(iter(value.values())))
    return str(value)


def detection_cells(sweep: Sweep, spec: DetectionSpec) -> dict[tuple[str, float], list[RunDetection]]:
    """(behaviour, rate) → one detection per completed seed."""
    cells: dict[tuple[str, float], list[RunDetection]] = {}
    for run in sweep.runs:
        config = sweep.configs.get(run.job)
        if not run.complete or config is None:
            continue
        behaviour = row_label(dotted_get(config, spec.by))
        rate = float(dotted_get(config, spec.factor) or 0.0)
        cells.setdefault((behaviour, rate), []).append(run_detection(run.events, spec))
    return cells


def detection_section(sweep: Sweep, spec: DetectionSpec, slug: str, figures: Path) -> list[str]:
    cells = detection_cells(sweep, spec)
    if not cells:
        return []
    behaviours = sorted({b for b, _ in cells}, key=natural_key)
    rates = sorted({r for _, r in cells})
    rows = []
    for behaviour in behaviours:
        row = [behaviour]
        for rate in rates:
            runs = cells.get((behaviour, rate), [])
            caught = [r for r in runs if r.caught]
            first = statistics.fmean(r.first_step for r in caught) if caught else None
            row.append(f"{len(caught)}/{len(runs)}" + (f" (step {first:.0f})" if first is not None else ""))
        rows.append(row)
    failed, audited = map(
        sum,
        zip(*(honest_tallies(r.events, spec.honest_prefixes) for r in sweep.runs if r.complete), strict=True),
    )
    within = f" within {spec.within} steps" if spec.within else ""
    lines = [
        "",
        f"### Caught by audits{within}: seeds caught / seeds (mean first step caught)",
        "",
        *markdown_table(
            ["behaviour", *(f"{spec.factor}={rate:g}" for rate in rates)], rows, align="l" + "r" * len(rates)
        ),
        "",
        f"Honest miners: {failed:.0f} failed of {audited:.0f} audits over all runs"
        + (f" (false-positive rate {failed / audited:.2%})." if audited else "."),
        "",
    ]
    png = figures / f"{slug}_detection.png"
    plot_detection(cells, behaviours, rates, spec, png)
    return lines + [figure_link(f"{slug} detection vs {spec.factor}", png, figures.name), ""]


def plot_detection(cells, behaviours: list[str], rates: list[float], spec: DetectionSpec, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for behaviour in behaviours:
        points = [
            (rate, statistics.fmean(r.caught for r in cells[(behaviour, rate)]))
            for rate in rates
            if cells.get((behaviour, rate))
        ]
        ax.plot(*zip(*points, strict=True), marker="o", label=behaviour)
    ax.set_xlabel(spec.factor)
    ax.set_ylabel("fraction of seeds caught")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=120)
