"""Compare the runs of a Hydra multirun sweep: `comparison.md` plus loss and load-balance plots.

A sweep dir holds numbered job dirs `0/`, `1/`, ... each with `.hydra/overrides.yaml`, `metrics.jsonl`
and, when the run completed, `summary.json`. Runs that differ only in `seed` form one row, reported as
mean ± sample std over seeds. Every job dir is accounted for: a run that failed (no summary.json), has
no metrics, or cannot be read is named in the report, never skipped silently.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from moe.engine.metrics import METRICS_FILE, read_metrics
from moe.engine.run_info import RUN_INFO_FILE, SUMMARY_FILE
from moe.errors import DataError, PoimoeError
from moe.experiments.columns import (
    CAUSALITY_NOTE,
    COLUMNS,
    Column,
    EventValue,
    causality_label,
    declared_causality,
    event_metric,
    is_number,
    layer_mean,
)
from moe.experiments.render import figure_link, markdown_table, mean_pm_std, pyplot, save_figure

log = logging.getLogger(__name__)

OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
HYDRA_CONFIG_FILE = Path(".hydra") / "config.yaml"
SEED_KEYS = {"seed"}
VAL_LOSS_PLOT, LOAD_CV_PLOT = "val_loss.png", "load_cv.png"


@dataclass
class JobRun:
    """One job dir of the sweep and what could be read from it."""

    job: str
    overrides: list[str]
    summary: dict | None
    events: list[dict]
    problems: list[str] = field(default_factory=list)
    router: dict | None = None  # the run's `router` config node (name and options), when it can be told
    causal_loss: float | None = None  # its val loss by prefix evaluation (`add_causal_losses`)

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

    @property
    def looks_ahead_at_eval(self) -> bool:
        """A byte LM (its summary has bits/byte) whose router is declared non-causal at evaluation."""
        declared = declared_causality(self.router)
        return (
            self.complete
            and declared is not None
            and not declared[1]
            and is_number(self.summary.get("val/bpb"))
        )


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
    run.router = router_node(job_dir, run.overrides)
    return run


def router_node(job_dir: Path, overrides: list[str]) -> dict | None:
    """The job's `router` config: run_info.json's resolved config, else Hydra's saved config, else the
    `router=` / `router.<key>=` overrides (enough when the router is the default's plus overrides)."""
    for source in (job_dir / RUN_INFO_FILE, job_dir / HYDRA_CONFIG_FILE):
        try:
            config = OmegaConf.to_container(OmegaConf.load(source), resolve=False)
        except Exception:  # missing or unreadable: try the next source
            continue
        config = config.get("config", config) if source.name == RUN_INFO_FILE else config
        if isinstance(config, dict) and isinstance(config.get("router"), dict):
            return config["router"]
    node = {}
    for key, value in map(split_override, overrides):
        if key == "router":
            node["name"] = value
        elif key.startswith("router."):
            node[key.removeprefix("router.")] = value
    return node if "name" in node else None


# ---------------------------------------------------------------------------------------------- curves


def curve(events: list[dict], value_of: EventValue) -> dict[int, float]:
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


CAUSAL_LOSS_TITLE = "causal val loss"


def table(
    rows: dict[tuple[str, ...], list[JobRun]], columns: list[Column] | None = None, *, causal: bool = False
) -> list[str]:
    """One row per override combination, mean ± std over seeds of each column (default `COLUMNS`); with
    `causal`, a column saying whether the row's router is causal (see `causality_label`) and, after the
    val loss, its causal val loss (see `causal_loss_cell`)."""
    columns = COLUMNS if columns is None else columns
    titles = [c.title for c in columns]
    at = titles.index("val loss") + 1 if causal and "val loss" in titles else None
    common = common_overrides(rows)
    lines = [f"Common to all rows: `{' '.join(common)}`", ""] if common else []
    body = []
    for config, runs in rows.items():
        cells = [
            mean_pm_std([v for r in runs if (v := c.final(r.summary, r.events)) is not None], c.fmt)
            for c in columns
        ]
        if at is not None:
            cells.insert(at, causal_loss_cell(runs))
        labels = [causality_label(runs[0].router)] if causal else []
        body.append([config_label(config, common), ", ".join(r.seed for r in runs), *labels, *cells])
    if at is not None:
        titles.insert(at, CAUSAL_LOSS_TITLE)
    header = ["run", "seeds", *(["causal"] if causal else []), *titles]
    return lines + markdown_table(header, body, align="ll" + "l" * causal + "r" * len(titles))


def causal_loss_cell(runs: list[JobRun]) -> str:
    """'= val loss' where the row's evaluation routing is causal, '?' where its router is unknown, else the
    mean ± std of its runs' causal val losses (`add_causal_losses`; n/a when none could be computed)."""
    declared = declared_causality(runs[0].router)
    if declared is None:
        return "?"
    if declared[1]:
        return "= val loss"
    return mean_pm_std([r.causal_loss for r in runs if r.causal_loss is not None], ".4f")


def add_causal_losses(runs: list[JobRun], job_dir: Callable[[JobRun], Path]) -> None:
    """Fill in `causal_loss` for every run that `looks_ahead_at_eval`, by prefix evaluation of its
    checkpoint in `job_dir(run)` (cached there); a run where that fails says why among its problems."""
    from moe.experiments.prefix_eval import causal_val_loss  # loads torch and the model: only when needed

    for run in (r for r in runs if r.looks_ahead_at_eval):
        try:
            run.causal_loss = causal_val_loss(job_dir(run))["val/causal_loss"]
        except PoimoeError as err:
            run.problems.append(f"no causal val loss: {err}")


def plot_mean_curve_per_row(
    rows: dict[tuple[str, ...], list[JobRun]], value_of: EventValue, ylabel: str, path: Path
) -> bool:
    """A metric against the step, one line per row (mean over its seeds); returns whether anything was drawn."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
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
    save_figure(fig, path)
    return drawn


def runs_section(runs: list[JobRun]) -> list[str]:
    rows = [
        [run.job, " ".join(run.overrides) or "(none)", "; ".join(run.problems) if run.problems else "ok"]
        for run in runs
    ]
    return ["## Runs found", "", *markdown_table(["job", "overrides", "status"], rows, align="r")]


def problem_lines(runs: list[JobRun]) -> list[str]:
    """One line per run with a problem, saying what it is and whether the run still counts."""
    lines = []
    for run in (r for r in runs if r.problems):
        used = "counted in the table" if run.complete else "not in the table"
        lines.append(
            f"- job {run.job} ({' '.join(run.overrides) or 'overrides unknown'}): {'; '.join(run.problems)} — {used}"
        )
    return lines


def problems_section(runs: list[JobRun]) -> list[str]:
    lines = problem_lines(runs)
    return ["## Runs with problems", "", *lines] if lines else []


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
    add_causal_losses(runs, lambda run: multirun_dir / run.job)
    rows = group_rows(runs)
    failed = [r for r in runs if not r.complete]
    without_metrics = [r for r in runs if r.complete and not r.events]
    val_loss_png, load_cv_png = multirun_dir / VAL_LOSS_PLOT, multirun_dir / LOAD_CV_PLOT
    plot_mean_curve_per_row(rows, event_metric("val/loss"), "val loss", val_loss_png)
    plot_mean_curve_per_row(
        rows, lambda e: layer_mean(e, "load_cv"), "load CV (mean over layers)", load_cv_png
    )
    lines = [
        f"# Sweep comparison: {multirun_dir}",
        "",
        found_line(runs, failed, without_metrics),
        "",
        *table(rows, causal=True),
        "",
        "One row per distinct override combination apart from `seed`; mean ± sample std over its seeds. "
        "Val loss, bits/byte and tokens/s are the final values from summary.json (the last logged value "
        "where summary.json lacks one); load CV, MaxVio, 1st-choice MaxVio (before capacity drops) and "
        "dropped % are pooled over the whole validation set in evaluation mode at the final validation, "
        "averaged over MoE layers (– for runs that did not log them). " + CAUSALITY_NOTE,
        "",
        figure_link("val loss vs step", val_loss_png),
        "",
        figure_link("load CV vs step (training batches)", load_cv_png),
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
