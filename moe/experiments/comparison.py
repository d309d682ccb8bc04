"""Compare the runs of a Hydra multirun sweep: `comparison.md` plus loss and load-balance plots.

A sweep dir holds numbered job dirs `0/`, `1/`, ... each with `.hydra/overrides.yaml`, `metrics.jsonl`
and, when the run completed, `summary.json`. Runs that differ only in `seed` form one row, reported as
mean ± sample std over seeds. Every job dir is accounted for: a run that failed (no summary.json), has
no metrics, or cannot be read is named in the report, never skipped silently.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from moe.engine.metrics import METRICS_FILE, read_metrics
from moe.errors import DataError

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
SEED_KEYS = {"seed"}
VAL_LOSS_PLOT, LOAD_CV_PLOT = "val_loss.png", "load_cv.png"


@dataclass(frozen=True)
class Column:
    title: str
    final: Callable[[dict | None, list[dict]], float | None]
    fmt: str


@dataclass
class JobRun:
    """One job dir of the sweep and what could be read from it."""

    job: str
    overrides: list[str]
    summary: dict | None
    events: list[dict]
    problems: list[str] = field(default_factory=list)

    @property
    def seed(self) -> str:
        return next((value for key, value in map(split_override, self.overrides) if key in SEED_KEYS), "-")

    @property
    def config(self) -> tuple[str, ...]:
        """The overrides that define its row: all but the seed."""
        return tuple(o for o in self.overrides if split_override(o)[0] not in SEED_KEYS)

    @property
    def complete(self) -> bool:
        return self.summary is not None


def split_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def config_label(config: tuple[str, ...], common: tuple[str, ...] = ()) -> str:
    """The overrides that set this row apart (those shared by every row are stated once, above the table)."""
    varying = [o for o in config if o not in common]
    if varying:
        return ", ".join(varying)
    return "(common overrides only)" if common else "(defaults)"


def common_overrides(rows: dict[tuple[str, ...], list[JobRun]]) -> tuple[str, ...]:
    configs = list(rows)
    if len(configs) < 2:
        return ()
    return tuple(o for o in configs[0] if all(o in c for c in configs[1:]))


# ---------------------------------------------------------------------------------------------- reading


def find_job_dirs(multirun_dir: Path) -> list[Path]:
    if not multirun_dir.is_dir():
        raise DataError(f"sweep dir {multirun_dir} does not exist")
    jobs = sorted(
        (p for p in multirun_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )
    if not jobs:
        raise DataError(f"no job dirs (0/, 1/, ...) in {multirun_dir}: is it a Hydra multirun dir?")
    return jobs


def read_job(job_dir: Path) -> JobRun:
    run = JobRun(job=job_dir.name, overrides=[], summary=None, events=[])
    try:
        overrides = OmegaConf.to_container(OmegaConf.load(job_dir / OVERRIDES_FILE))
        run.overrides = [str(o) for o in overrides or []]
    except Exception as err:  # missing file, bad YAML or not a list: all mean "cannot tell what this ran"
        run.problems.append(f"overrides unreadable ({OVERRIDES_FILE}: {type(err).__name__})")
    summary_path = job_dir / SUMMARY_FILE
    if not summary_path.exists():
        run.problems.append(f"failed: no {SUMMARY_FILE}")
    else:
        try:
            run.summary = json.loads(summary_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            run.problems.append(f"failed: {SUMMARY_FILE} unreadable ({type(err).__name__})")
    if (job_dir / METRICS_FILE).exists():
        run.events = read_metrics(job_dir)
    if not run.events:
        run.problems.append(f"no metrics ({METRICS_FILE} missing or empty)")
    return run


# ---------------------------------------------------------------------------------------------- metrics


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def plain_metric(key: str) -> Callable[[dict | None, list[dict]], float | None]:
    """Final value of `key`: summary.json's, else the last logged one."""

    def final(summary: dict | None, events: list[dict]) -> float | None:
        if summary is not None and is_number(summary.get(key)):
            return float(summary[key])
        return next((float(e[key]) for e in reversed(events) if is_number(e.get(key))), None)

    return final


def layer_mean(record: dict, name: str) -> float | None:
    """Mean over MoE layers of `router/<layer>/<name>` (or a layerless `router/<name>`) in one record."""
    pattern = re.compile(rf"^router/(?:[^/]+/)?{re.escape(name)}$")
    values = [float(v) for k, v in record.items() if pattern.match(k) and is_number(v)]
    return statistics.fmean(values) if values else None


def router_metric(name: str, scale: float = 1.0) -> Callable[[dict | None, list[dict]], float | None]:
    """Final layer-mean of a routing metric: summary.json's if it has one, else the last logged event's."""

    def final(summary: dict | None, events: list[dict]) -> float | None:
        for record in [summary or {}, *reversed(events)]:
            value = layer_mean(record, name)
            if value is not None:
                return value * scale
        return None

    return final


COLUMNS = [
    Column("val loss", plain_metric("val/loss"), ".4f"),
    Column("bits/byte", plain_metric("val/bpb"), ".4f"),
    Column("load CV", router_metric("load_cv"), ".3f"),
    Column("MaxVio", router_metric("max_vio"), ".3f"),
    Column("dropped %", router_metric("dropped_frac", scale=100.0), ".2f"),
    Column("tokens/s", plain_metric("perf/tokens_per_s"), ".0f"),
]


def mean_pm_std(values: list[float], fmt: str) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{statistics.fmean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def curve(events: list[dict], value_of: Callable[[dict], float | None]) -> dict[int, float]:
    points = {}
    for event in events:
        value = value_of(event)
        if value is not None and isinstance(event.get("step"), int):
            points[event["step"]] = value
    return points


def mean_curve(curves: list[dict[int, float]]) -> tuple[list[int], list[float]]:
    """Mean over seeds at every step that any seed logged."""
    steps = sorted(set().union(*curves)) if curves else []
    return steps, [statistics.fmean(c[s] for c in curves if s in c) for s in steps]


# ---------------------------------------------------------------------------------------------- writing


def group_rows(runs: list[JobRun]) -> dict[tuple[str, ...], list[JobRun]]:
    rows: dict[tuple[str, ...], list[JobRun]] = {}
    for run in runs:
        if run.complete and not any(p.startswith("overrides") for p in run.problems):
            rows.setdefault(run.config, []).append(run)
    return rows


def table(rows: dict[tuple[str, ...], list[JobRun]], columns: list[Column] | None = None) -> list[str]:
    """One row per override combination, mean ± std over seeds of each column (default `COLUMNS`)."""
    columns = COLUMNS if columns is None else columns
    common = common_overrides(rows)
    lines = [f"Common to all rows: `{' '.join(common)}`", ""] if common else []
    lines += [
        "| run | seeds | " + " | ".join(c.title for c in columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    for config, runs in rows.items():
        cells = [
            mean_pm_std([v for r in runs if (v := c.final(r.summary, r.events)) is not None], c.fmt)
            for c in columns
        ]
        seeds = ", ".join(r.seed for r in runs)
        lines.append(f"| {config_label(config, common)} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def plot_curves(
    rows: dict[tuple[str, ...], list[JobRun]],
    value_of: Callable[[dict], float | None],
    ylabel: str,
    path: Path,
) -> bool:
    """One line per row (mean over its seeds); returns whether anything was drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    common = common_overrides(rows)
    for config, runs in rows.items():
        steps, values = mean_curve([c for r in runs if (c := curve(r.events, value_of))])
        if steps:
            ax.plot(
                steps, values, marker="." if len(steps) < 30 else None, label=config_label(config, common)
            )
            drawn = True
    if drawn:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, f"no run logged {ylabel}", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def runs_section(runs: list[JobRun]) -> list[str]:
    lines = ["## Runs found", "", "| job | overrides | status |", "|---:|---|---|"]
    for run in runs:
        status = "; ".join(run.problems) if run.problems else "ok"
        lines.append(f"| {run.job} | {' '.join(run.overrides) or '(none)'} | {status} |")
    return lines


def problems_section(runs: list[JobRun]) -> list[str]:
    troubled = [r for r in runs if r.problems]
    if not troubled:
        return []
    lines = ["## Runs with problems", ""]
    for run in troubled:
        used = "counted in the table" if run.complete else "not in the table"
        lines.append(
            f"- job {run.job} ({' '.join(run.overrides) or 'overrides unknown'}): {'; '.join(run.problems)} — {used}"
        )
    return lines


def found_line(runs: list[JobRun], failed: list[JobRun], without_metrics: list[JobRun]) -> str:
    def jobs(subset: list[JobRun]) -> str:
        return f" (jobs {', '.join(r.job for r in subset)})" if subset else ""

    return (
        f"Found {len(runs)} job dirs: {len(runs) - len(failed)} complete, {len(failed)} failed{jobs(failed)}, "
        f"{len(without_metrics)} complete without metrics{jobs(without_metrics)}."
    )


def compare_sweep(multirun_dir: Path) -> Path:
    """Write `comparison.md`, `val_loss.png` and `load_cv.png` into `multirun_dir`; returns the .md path."""
    multirun_dir = Path(multirun_dir)
    runs = [read_job(job_dir) for job_dir in find_job_dirs(multirun_dir)]
    rows = group_rows(runs)
    failed = [r for r in runs if not r.complete]
    without_metrics = [r for r in runs if r.complete and not r.events]
    plot_curves(
        rows,
        lambda e: float(e["val/loss"]) if is_number(e.get("val/loss")) else None,
        "val loss",
        multirun_dir / VAL_LOSS_PLOT,
    )
    plot_curves(
        rows, lambda e: layer_mean(e, "load_cv"), "load CV (mean over layers)", multirun_dir / LOAD_CV_PLOT
    )
    lines = [
        f"# Sweep comparison: {multirun_dir}",
        "",
        found_line(runs, failed, without_metrics),
        "",
        *table(rows),
        "",
        "One row per distinct override combination apart from `seed`; mean ± sample std over its seeds. "
        "Val loss, bits/byte and tokens/s are the final values from summary.json (the last logged value "
        "where summary.json lacks one); load CV, MaxVio and dropped % are the last logged routing metrics, "
        "averaged over MoE layers.",
        "",
        f"![val loss vs step]({VAL_LOSS_PLOT})",
        "",
        f"![load CV vs step]({LOAD_CV_PLOT})",
        "",
        *runs_section(runs),
        "",
        *problems_section(runs),
    ]
    out = multirun_dir / "comparison.md"
    out.write_text("\n".join(lines).rstrip() + "\n")
    log.info("compared %d runs (%d rows, %d failed) into %s", len(runs), len(rows), len(failed), out)
    for run in runs:
        if run.problems:
            log.warning("job %s: %s", run.job, "; ".join(run.problems))
    return out
