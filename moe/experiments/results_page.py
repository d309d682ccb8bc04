"""The results page: `python eval.py report=<folder of sweeps> [out=<page.md>]` → the page + `figures/`.

Every Hydra multirun dir found under the folder (numbered job dirs holding `.hydra/`) becomes one
section, named after the experiment its jobs ran (the config's `name`). Each section states how the
numbers were made: the exact command (from the sweep's `multirun.yaml`), the seeds, the scale, the
wall time and the machine (from `run_info.json`), then the table (mean ± std over seeds, through
`moe.experiments.comparison`; for byte LMs with each router's causality and, where evaluation routing
looks ahead, the causal val loss by prefix evaluation of the runs' checkpoints) and the plots. Runs
that failed, cannot be read, or never started (fewer job dirs than the sweep defines) are listed, never
dropped silently. What a section shows beyond the
standard columns comes from the `report:` block of its experiment file (`moe.experiments.page_spec`).
A `NOTES.md` in the folder (what was run at which scale, and why) is copied in under the page's header.

The page goes to `<folder>/results.md` unless `out` names another page; figures go to `figures/` next
to it. Folders are named relative to the current directory (or by name when outside it), so a
committed page holds no machine's absolute paths.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from pathlib import Path

from moe.experiments.columns import CAUSALITY_NOTE, event_metric
from moe.experiments.comparison import add_causal_losses, plot_mean_curve_per_row, problem_lines, table
from moe.experiments.detection import detection_section
from moe.experiments.page_sections import fidelity_section, gap_grid_section, routing_heatmaps_section
from moe.experiments.page_spec import ReportSpec, columns_for, load_report_spec
from moe.experiments.render import display_path, figure_link
from moe.experiments.sweeps import (
    Sweep,
    experiment_override,
    find_sweep_dirs,
    machine_line,
    missing_jobs_lines,
    read_sweep,
    scale_line,
    seeds_line,
    sweep_command,
    wall_time_line,
)
from moe.experiments.tradeoffs import tradeoff_section

log = logging.getLogger(__name__)

RESULTS_FILE, FIGURES_DIR = "results.md", "figures"
NOTES_FILE = "NOTES.md"  # optional, in the report folder: copied into the page under its header


def page_path(root: Path, out: Path | None) -> Path:
    """Where the page goes: `out` when it names a .md file, `out/results.md` for a folder, else
    `<root>/results.md` (beside the sweeps, never in the source tree)."""
    if out is None:
        return Path(root) / RESULTS_FILE
    return Path(out) if Path(out).suffix == ".md" else Path(out) / RESULTS_FILE


def experiment_file(sweep: Sweep, experiment_dir: Path) -> Path:
    """The experiment file the sweep ran: its `experiment=` override, else the experiment's name."""
    return Path(experiment_dir) / f"{experiment_override(sweep) or sweep.experiment}.yaml"


def section_title(sweep: Sweep, slug: str) -> str:
    """The experiment, with the sweep dir's name when the experiment has several sweeps."""
    return sweep.experiment if slug == sweep.experiment else f"{sweep.experiment} ({sweep.path.name})"


def anchor(title: str) -> str:
    """The link target a markdown renderer (GitHub) gives a heading."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def slugs_for(sweeps: list[Sweep]) -> list[str]:
    """Figure-name prefixes: the experiment, with the sweep dir's name when one experiment has several
    sweeps (a sweep dir named after its experiment keeps the plain name)."""
    counts: dict[str, int] = {}
    for sweep in sweeps:
        counts[sweep.experiment] = counts.get(sweep.experiment, 0) + 1
    return [
        s.experiment
        if counts[s.experiment] == 1 or s.path.name == s.experiment
        else f"{s.experiment}-{re.sub(r'[^A-Za-z0-9_.-]', '_', s.path.name)}"
        for s in sweeps
    ]


def sweep_section(sweep: Sweep, slug: str, figures: Path, root: Path, spec_file: Path | None) -> list[str]:
    """One experiment's section: how it was run, its table, its figures and its missing runs."""
    known = spec_file is not None and spec_file.exists()
    spec = load_report_spec(spec_file) if known else ReportSpec()
    curve_png = figures / f"{slug}_val_loss.png"
    plot_mean_curve_per_row(sweep.rows, event_metric("val/loss"), "val loss", curve_png)
    complete = sum(r.complete for r in sweep.runs)
    summaries = [r.summary for r in sweep.runs if r.summary]
    byte_lm = any("val/bpb" in summary for summary in summaries)  # causality means something for an LM only
    if byte_lm:
        add_causal_losses(sweep.runs, sweep.job_dir)
    folder = Path(display_path(root)) / sweep.path.relative_to(root)
    about = (
        f"- Experiment file: `configs/experiment/{spec_file.name}` (its header names the published result)."
    )
    lines = [
        f"## {section_title(sweep, slug)}",
        "",
        *([about] if known else []),
        f"- Command: `{sweep_command(sweep)}`",
        f"- Sweep dir: `{folder}`; jobs: {len(sweep.runs)} found, {complete} complete"
        + (f", {sweep.expected_jobs} defined" if sweep.expected_jobs is not None else ""),
        f"- Seeds: {seeds_line(sweep)}",
        f"- Scale: {scale_line(sweep)}",
        f"- Wall time: {wall_time_line(sweep)}",
        f"- Machine: {machine_line(sweep)}",
        "",
        *table(sweep.rows, columns_for(spec, summaries), causal=byte_lm),
        "",
        "Mean ± sample std over seeds; final values from summary.json (see `moe/experiments/comparison.py`)."
        + (" " + CAUSALITY_NOTE if byte_lm else ""),
        "",
        figure_link(f"{slug} val loss", curve_png, figures.name),
        "",
    ]
    return lines + special_sections(sweep, spec, slug, figures) + failures_lines(sweep)


def special_sections(sweep: Sweep, spec: ReportSpec, slug: str, figures: Path) -> list[str]:
    """The sections the experiment's `report:` block asks for, in a fixed order."""
    lines = []
    if spec.gap_grid is not None:
        lines += gap_grid_section(sweep, spec.gap_grid, slug, figures)
    if spec.routing_heatmaps is not None:
        lines += routing_heatmaps_section(sweep, spec.routing_heatmaps, slug, figures)
    if spec.detection is not None:
        lines += detection_section(sweep, spec.detection, slug, figures)
    if spec.fidelity_table:
        lines += fidelity_section(sweep)
    if spec.tradeoff is not None:
        lines += tradeoff_section(sweep, spec.tradeoff, slug, figures)
    return lines


def failures_lines(sweep: Sweep) -> list[str]:
    problems = problem_lines(sweep.runs)
    missing = missing_jobs_lines(sweep)
    if not problems and not missing:
        return ["All jobs of this sweep completed.", ""]
    return ["**Missing or failed runs:**", "", *problems, *missing, ""]


def write_results_page(root: Path, out: Path | None = None, experiment_dir: Path | None = None) -> Path:
    """Write the page (see `page_path`) and its `figures/`; returns the page's path. Each section reads
    its `report:` block from `<experiment_dir>/<experiment>.yaml` (standard columns only without one)."""
    root = Path(root)
    page = page_path(root, out)
    figures = page.parent / FIGURES_DIR
    figures.mkdir(parents=True, exist_ok=True)
    sweeps = sorted((read_sweep(p) for p in find_sweep_dirs(root)), key=lambda s: (s.experiment, str(s.path)))
    slugs = slugs_for(sweeps)
    command = f"report={display_path(root)}" + (f" out={display_path(page)}" if out is not None else "")
    lines = [
        "# Results",
        "",
        f"Generated by `python eval.py {command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC "
        f"from {len(sweeps)} sweep(s); regenerate rather than edit. Each section names the command, seeds, "
        "scale, wall time and machine of its runs; missing or failed runs are listed in their section.",
        "",
        "Contents: "
        + ", ".join(f"[{title}](#{anchor(title)})" for title in map(section_title, sweeps, slugs)),
        "",
    ]
    notes = root / NOTES_FILE
    if notes.exists():  # the person who ran the sweeps says what they chose and why
        lines += [notes.read_text().strip(), ""]
    for sweep, slug in zip(sweeps, slugs, strict=True):
        spec_file = experiment_file(sweep, experiment_dir) if experiment_dir is not None else None
        lines += sweep_section(sweep, slug, figures, root, spec_file)
        log.info("%s: %d jobs from %s", sweep.experiment, len(sweep.runs), sweep.path)
    page.write_text("\n".join(lines).rstrip() + "\n")
    return page
