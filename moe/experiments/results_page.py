"""The results page: `python eval.py report=<folder of sweeps>` → `docs/results.md` + `docs/figures/*.png`.

Every Hydra multirun dir found under the folder (numbered job dirs holding `.hydra/`) becomes one
section, named after the experiment its jobs ran (the config's `name`). Each section states how the
numbers were made: the exact command (from the sweep's `multirun.yaml`), the seeds, the scale, the
wall time and the machine (from `run_info.json`), then the table (mean ± std over seeds, through
`moe.experiments.comparison`) and the plots. Runs that failed, cannot be read, or never started (fewer job dirs
than the sweep defines) are listed, never dropped silently. Some experiments add a section of their
own (`EXTRA_SECTIONS`): the fault-tolerance claim check, the specialisation heatmaps. A `NOTES.md`
in the folder (what was run at which scale, and why) is copied in under the page's header.

Legend: G domains, E experts.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from omegaconf import OmegaConf

from moe.engine.validation import read_routing_tables, routing_mutual_information
from moe.errors import DataError
from moe.experiments.comparison import (
    COLUMNS,
    OVERRIDES_FILE,
    Column,
    JobRun,
    group_rows,
    is_number,
    plain_metric,
    plot_curves,
    problems_section,
    read_job,
    split_override,
    table,
)

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "docs"
RESULTS_FILE, FIGURES_DIR = "results.md", "figures"
NOTES_FILE = "NOTES.md"  # optional, in the report folder: copied into the page under its header
FEW_PERCENT = 5.0  # "within a few percent" of the failure-free loss, for the fault-tolerance verdict
DROP_KEY = "transport.network.default.drop_prob"
LATENCY_KEY = "transport.network.default.latency_ms"
SCALE_KEYS = (
    "data.name",
    "model.arch",
    "model.d_model",
    "model.n_layers",
    "experts.num",
    "experts.d_ff",
    "router.name",
    "data.batch_size",
    "data.seq_len",
    "trainer.max_steps",
)


@dataclass
class Sweep:
    """One multirun dir: its jobs as `moe.experiments.comparison` reads them, plus what the page says about them."""

    path: Path
    experiment: str
    runs: list[JobRun]
    configs: dict[str, dict] = field(default_factory=dict)  # job → resolved config (run_info.json)
    run_infos: dict[str, dict] = field(default_factory=dict)  # job → run_info.json
    task_overrides: list[str] = field(default_factory=list)
    expected_jobs: int | None = None

    @property
    def rows(self) -> dict[tuple[str, ...], list[JobRun]]:
        return group_rows(self.runs)

    def job_dir(self, run: JobRun) -> Path:
        return self.path / run.job


# ---------------------------------------------------------------------------------------------- finding


def find_sweep_dirs(root: Path) -> list[Path]:
    """Multirun dirs under `root` (or `root` itself): dirs with a numbered job dir holding `.hydra/`."""
    if not root.is_dir():
        raise DataError(f"report folder {root} does not exist")
    sweeps = {
        Path(folder).parent
        for folder, _, files in os.walk(root, followlinks=True)  # sweeps may be linked into the folder
        if OVERRIDES_FILE.name in files
        and Path(folder).name == OVERRIDES_FILE.parent.name
        and Path(folder).parent.name.isdigit()
    }
    sweeps = {job_dir.parent for job_dir in sweeps}
    if not sweeps:
        raise DataError(f"no Hydra multirun dirs (numbered job dirs with .hydra/) under {root}")
    return sorted(sweeps)


def read_sweep(path: Path) -> Sweep:
    jobs = sorted((p for p in path.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    runs = [read_job(job) for job in jobs]
    sweep = Sweep(path=path, experiment="", runs=runs)
    for job in jobs:
        info = _read_yaml(job / "run_info.json")
        if info:
            sweep.run_infos[job.name] = info
        config = (info or {}).get("config") or _read_yaml(job / ".hydra" / "config.yaml")
        if config:
            sweep.configs[job.name] = config
    multirun = _read_yaml(path / "multirun.yaml") or {}
    hydra = multirun.get("hydra") or {}
    sweep.task_overrides = [str(o) for o in ((hydra.get("overrides") or {}).get("task") or [])]
    sweep.expected_jobs = expected_job_count(sweep.task_overrides, (hydra.get("sweeper") or {}).get("params"))
    sweep.experiment = experiment_name(sweep)
    return sweep


def _read_yaml(path: Path) -> dict | None:
    """A YAML (or JSON) file as a plain dict; None when missing or unreadable (the page says so)."""
    if not path.exists():
        return None
    try:
        content = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:  # any parse error means the same to the page: this file tells us nothing
        log.warning("cannot read %s: %s", path, err)
        return None
    return content if isinstance(content, dict) else None


def experiment_name(sweep: Sweep) -> str:
    """The jobs' config `name`, else the `experiment=` override, else the sweep dir's name."""
    names = {str(c.get("name")) for c in sweep.configs.values() if c.get("name")}
    if len(names) == 1:
        return names.pop()
    overrides = [o for r in sweep.runs for o in r.overrides] + sweep.task_overrides
    experiment = next((v for k, v in map(split_override, overrides) if k == "experiment"), None)
    return experiment or sweep.path.name


def expected_job_count(task_overrides: list[str], sweeper_params: dict | None) -> int | None:
    """How many jobs the sweep defines: the product of its sweep lengths (command line over config)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    merged = {key: f"{key}={value}" for key, value in (sweeper_params or {}).items()}
    merged |= {split_override(o)[0]: o for o in task_overrides}
    try:
        parsed = OverridesParser.create().parse_overrides(list(merged.values()))
    except Exception as err:  # an unparsable sweep definition only costs the missing-job check
        log.warning("cannot count the sweep's jobs: %s", err)
        return None
    return math.prod(len(list(o.sweep_iterator())) if o.is_sweep_override() else 1 for o in parsed)


# ---------------------------------------------------------------------------------------------- facts


def sweep_command(sweep: Sweep) -> str:
    overrides = " ".join(shlex.quote(o) for o in sweep.task_overrides)
    return f"python train.py -m {overrides}".rstrip()


def seeds_line(sweep: Sweep) -> str:
    seeds = sorted({str(c.get("seed")) for c in sweep.configs.values() if "seed" in c}, key=_natural)
    return ", ".join(seeds) or "unknown"


def _natural(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def scale_line(sweep: Sweep) -> str:
    """The settings that set the compute of a job, with every value the jobs used."""
    parts = []
    for key in SCALE_KEYS:
        values = sorted({str(_lookup(c, key)) for c in sweep.configs.values()} - {"None"}, key=_natural)
        if values:
            parts.append(f"{key}={'/'.join(values)}")
    return ", ".join(parts) or "unknown (no run_info.json)"


def _lookup(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def wall_time_line(sweep: Sweep) -> str:
    """Training-loop seconds summed over jobs (summary.json) and the sweep's span from file times."""
    loop_s = [
        r.summary["perf/wall_s"] for r in sweep.runs if r.summary and is_number(r.summary.get("perf/wall_s"))
    ]
    starts, ends = [], []
    for run in sweep.runs:
        files = [p for p in sweep.job_dir(run).rglob("*") if p.is_file()]
        if files:
            starts.append(min(p.stat().st_mtime for p in files))
            ends.append(max(p.stat().st_mtime for p in files))
    span = f"; sweep span ≈ {max(ends) - min(starts):.0f} s (first job's first file to last job's last file)"
    return f"training loops {sum(loop_s):.1f} s summed over {len(loop_s)} jobs" + (span if starts else "")


def machine_line(sweep: Sweep) -> str:
    machines = set()
    for info in sweep.run_infos.values():
        machine = info.get("machine") or {}
        machines.add(
            f"{machine.get('cpus', '?')} CPU cores, device {info.get('device', '?')}, "
            f"{machine.get('platform', '?')}, torch {machine.get('torch', '?')}"
        )
    commits = {str(info.get("git_commit"))[:10] for info in sweep.run_infos.values()}
    text = "; ".join(sorted(machines)) or "unknown (no run_info.json)"
    return f"{text}; git commit {', '.join(sorted(commits))}" if commits else text


def missing_jobs_lines(sweep: Sweep) -> list[str]:
    if sweep.expected_jobs is None or sweep.expected_jobs <= len(sweep.runs):
        return []
    missing = sweep.expected_jobs - len(sweep.runs)
    return [
        f"- {missing} of the {sweep.expected_jobs} jobs the sweep defines have no job dir (never started)."
    ]


# ---------------------------------------------------------------------------------------------- sections


def layer_names(sweep: Sweep, prefix: str = "routing/", suffix: str = "/domain_mi") -> list[str]:
    pattern = re.compile(rf"^{re.escape(prefix)}([^/]+){re.escape(suffix)}$")
    names = {m.group(1) for r in sweep.runs if r.summary for k in r.summary if (m := pattern.match(k))}
    return sorted(names, key=_natural)


def last_logged(
    value_of: Callable[[dict], float | None],
) -> Callable[[dict | None, list[dict]], float | None]:
    """A column's final value computed from the last logged event that has it."""

    def final(summary: dict | None, events: list[dict]) -> float | None:
        return next((v for e in reversed(events) if (v := value_of(e)) is not None), None)

    return final


def miner_share(behaviour: str) -> Callable[[dict], float | None]:
    """Share of all miner balances held by the miners of one behaviour, in one event."""

    def share(event: dict) -> float | None:
        balances = {k: v for k, v in event.items() if k.startswith("rewards/balance/miner/") and is_number(v)}
        total = sum(balances.values())
        key = f"rewards/balance/miner/{behaviour}"
        return balances[key] / total if key in balances and total > 0 else None

    return share


def summed(keys: list[str]) -> Callable[[dict], float | None]:
    def total(event: dict) -> float | None:
        return sum(event[k] for k in keys) if all(is_number(event.get(k)) for k in keys) else None

    return total


def mean_logged(key: str) -> Callable[[dict | None, list[dict]], float | None]:
    """Mean of every logged value of `key` (a measurement repeated during training)."""

    def final(summary: dict | None, events: list[dict]) -> float | None:
        values = [float(e[key]) for e in events if is_number(e.get(key))]
        return statistics.fmean(values) if values else None

    return final


CABAL_MINERS = ["rewards/incentive/layer0/0", "rewards/incentive/layer0/1"]
EXTRA_COLUMNS: dict[str, list[Column]] = {
    "poi_fidelity": [
        Column(f"mean ρ {scorer} vs Shapley", mean_logged(f"poi/fidelity/layer0/{scorer}"), ".3f")
        for scorer in ("taylor", "loo", "gate")
    ],
    "dishonest_miners": [
        Column("rank lazy e1", plain_metric("poi/rank/layer0/1"), ".0f"),
        Column("rank adversarial e2", plain_metric("poi/rank/layer0/2"), ".0f"),
        Column("traffic e1", plain_metric("poi/load/layer0/1"), ".3f"),
        Column("traffic e2", plain_metric("poi/load/layer0/2"), ".3f"),
    ],
    "incentive_alignment": [
        Column("miner share lazy", last_logged(miner_share("lazy")), ".3f"),
        Column("miner share adversarial", last_logged(miner_share("adversarial")), ".3f"),
        Column("miner share honest", last_logged(miner_share("honest")), ".3f"),
    ],
    "validator_cabal": [
        Column("cabal miners' incentive", last_logged(summed(CABAL_MINERS)), ".3f"),
        Column(
            "their consensus weight",
            last_logged(summed([k.replace("incentive", "consensus") for k in CABAL_MINERS])),
            ".3f",
        ),
    ],
}


def columns_for(sweep: Sweep) -> list[Column]:
    """The comparison columns, trimmed or extended to what the experiment is about."""
    if sweep.experiment == "fault_tolerance":
        return [
            *COLUMNS[:2],
            COLUMNS[-1],
            Column("simulated tokens/s", plain_metric("perf/sim_tokens_per_s"), ".1f"),
        ]
    mi = [
        Column(f"MI {layer} (bits)", plain_metric(f"routing/{layer}/domain_mi"), ".3f")
        for layer in layer_names(sweep)
    ]
    return [*COLUMNS, *mi, *EXTRA_COLUMNS.get(sweep.experiment, [])]


def section_title(sweep: Sweep, slug: str) -> str:
    """The experiment, with the sweep dir's name when the experiment has several sweeps."""
    return sweep.experiment if slug == sweep.experiment else f"{sweep.experiment} ({sweep.path.name})"


def anchor(title: str) -> str:
    """The link target a markdown renderer (GitHub) gives a heading."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def sweep_section(sweep: Sweep, slug: str, figures: Path) -> list[str]:
    rows = sweep.rows
    curve_png = figures / f"{slug}_val_loss.png"
    plot_curves(
        rows, lambda e: float(e["val/loss"]) if is_number(e.get("val/loss")) else None, "val loss", curve_png
    )
    complete = sum(r.complete for r in sweep.runs)
    lines = [
        f"## {section_title(sweep, slug)}",
        "",
        f"- Experiment file: `configs/experiment/{sweep.experiment}.yaml` (its header names the published result).",
        f"- Command: `{sweep_command(sweep)}`",
        f"- Sweep dir: `{sweep.path}`; jobs: {len(sweep.runs)} found, {complete} complete"
        + (f", {sweep.expected_jobs} defined" if sweep.expected_jobs is not None else ""),
        f"- Seeds: {seeds_line(sweep)}",
        f"- Scale: {scale_line(sweep)}",
        f"- Wall time: {wall_time_line(sweep)}",
        f"- Machine: {machine_line(sweep)}",
        "",
        *table(rows, columns_for(sweep)),
        "",
        "Mean ± sample std over seeds; final values from summary.json (see `moe/comparison.py`).",
        "",
        f"![{slug} val loss]({figures.name}/{curve_png.name})",
        "",
    ]
    extra = EXTRA_SECTIONS.get(sweep.experiment)
    if extra is not None:
        lines += extra(sweep, slug, figures)
    lines += failures_lines(sweep)
    return lines


def failures_lines(sweep: Sweep) -> list[str]:
    problems = problems_section(sweep.runs)[2:]
    missing = missing_jobs_lines(sweep)
    if not problems and not missing:
        return ["All jobs of this sweep completed.", ""]
    return ["**Missing or failed runs:**", "", *problems, *missing, ""]


# ---------------------------------------------------------------------------------------------- fault tolerance


def cell_values(sweep: Sweep, key: str = "val/loss") -> dict[tuple[float, float], dict[str, float]]:
    """(drop probability, latency ms) → seed → the final `key` of that seed's completed run."""
    cells: dict[tuple[float, float], dict[str, float]] = {}
    for run in sweep.runs:
        config = sweep.configs.get(run.job)
        if not run.complete or config is None or not is_number(run.summary.get(key)):
            continue
        cell = (float(_lookup(config, DROP_KEY) or 0.0), float(_lookup(config, LATENCY_KEY) or 0.0))
        cells.setdefault(cell, {})[str(config.get("seed"))] = float(run.summary[key])
    return cells


def paired_gaps(by_seed: dict[str, float], base_by_seed: dict[str, float]) -> list[float]:
    """Percent loss change against the failure-free run of the same seed (same data order and init)."""
    return [100 * (v / base_by_seed[seed] - 1) for seed, v in sorted(by_seed.items()) if seed in base_by_seed]


def fault_tolerance_section(sweep: Sweep, slug: str, figures: Path) -> list[str]:
    """Final val loss against the failure-free loss at the same latency, and the claim's verdict."""
    by_seed = cell_values(sweep)
    cells = {cell: list(values.values()) for cell, values in by_seed.items()}
    lines = [
        "**Claim check** (Learning@home: with 10 % failures, training converges to within a few percent "
        f"of the failure-free loss; here 'a few' = {FEW_PERCENT:.0f} %):",
        "",
        "| drop prob | latency ms | val loss | Δ vs drop 0 (means) | Δ paired by seed |",
        "|---:|---:|---:|---:|---:|",
    ]
    for (drop, latency), losses in sorted(cells.items()):
        base = cells.get((0.0, latency))
        gap = f"{100 * (statistics.fmean(losses) / statistics.fmean(base) - 1):+.2f} %" if base else "n/a"
        paired = paired_gaps(by_seed[(drop, latency)], by_seed.get((0.0, latency), {}))
        paired_text = ", ".join(f"{g:+.2f} %" for g in paired) or "n/a"
        lines.append(f"| {drop:g} | {latency:g} | {_mean_std(losses)} | {gap} | {paired_text} |")
    lines += ["", verdict(cells), ""]
    if any(lat > 0 for _, lat in cells):
        lines += [
            "Latency runs in virtual time and draws no random numbers at a constant delay, so a latency row "
            "repeats its zero-latency row's loss exactly (a determinism check); latency and timeouts show "
            "only in the simulated tokens/s.",
            "",
        ]
    png = figures / f"{slug}_loss_vs_failures.png"
    throughput = {cell: list(v.values()) for cell, v in cell_values(sweep, "perf/sim_tokens_per_s").items()}
    if plot_loss_vs_failures(cells, throughput, png):
        lines += [f"![{slug} loss vs failure probability]({figures.name}/{png.name})", ""]
    return lines


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def verdict(cells: dict[tuple[float, float], list[float]]) -> str:
    """The claim's verdict from the drop-0.1 cells, next to the seed spread that limits what it can show."""
    gaps, spreads = [], []
    for (drop, latency), losses in cells.items():
        base = cells.get((0.0, latency))
        if drop == 0.1 and base:
            gaps.append(100 * (statistics.fmean(losses) / statistics.fmean(base) - 1))
            if len(base) > 1:
                spreads.append(100 * statistics.stdev(base) / statistics.fmean(base))
    if not gaps:
        return "Verdict: not testable from these runs (no drop 0.1 cell with a drop 0 baseline)."
    worst = max(gaps)
    holds = "holds" if worst <= FEW_PERCENT else "does NOT hold"
    spread = (
        f" The failure-free loss itself varies by {max(spreads):.2f} % (std) across seeds." if spreads else ""
    )
    return (
        f"Verdict at this scale: with 10 % of expert replies dropped the final val loss is {worst:+.2f} % "
        f"from the failure-free loss (worst latency cell): the claim {holds}.{spread}"
    )


def plot_loss_vs_failures(
    losses: dict[tuple[float, float], list[float]],
    throughput: dict[tuple[float, float], list[float]],
    path: Path,
) -> bool:
    """Final val loss and simulated tokens/s against the drop probability, one line per latency."""
    if not losses:
        return False
    plt = _pyplot()
    fig, (loss_ax, speed_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, cells in ((loss_ax, losses), (speed_ax, throughput)):
        for latency in sorted({lat for _, lat in cells}):
            points = sorted((drop, values) for (drop, lat), values in cells.items() if lat == latency)
            means = [statistics.fmean(v) for _, v in points]
            stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points]
            ax.errorbar(
                [d for d, _ in points],
                means,
                yerr=stds,
                marker="o",
                capsize=3,
                label=f"latency {latency:g} ms",
            )
        ax.set_xlabel("expert reply drop probability")
        ax.grid(alpha=0.3)
        ax.legend()
    loss_ax.set_ylabel("final val loss (nats)")
    speed_ax.set_ylabel("simulated tokens/s (wall + virtual network time)")
    speed_ax.set_yscale("log")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- specialisation


def routing_tables_by_row(sweep: Sweep) -> tuple[list[str], dict[str, dict[str, torch.Tensor]]]:
    """(domains, row label → layer → [G, E] counts) from each row's lowest seed. Seeds are not summed:
    expert indices mean nothing across seeds, so a sum would blur the specialisation it should show."""
    domains: list[str] = []
    by_row: dict[str, dict[str, torch.Tensor]] = {}
    for config, runs in sweep.rows.items():
        for run in sorted(runs, key=lambda r: _natural(r.seed)):
            found = read_routing_tables(sweep.job_dir(run))
            if found is not None:
                domains, tables = found
                by_row[f"{row_label(sweep, config)} (seed {run.seed})"] = tables
                break
    return domains, by_row


def row_label(sweep: Sweep, config: tuple[str, ...]) -> str:
    """A row's router when the sweep varies the router, else its overrides."""
    router = next((v for k, v in map(split_override, config) if k == "router"), None)
    return router or ", ".join(config) or "(defaults)"


def specialisation_section(sweep: Sweep, slug: str, figures: Path) -> list[str]:
    domains, by_row = routing_tables_by_row(sweep)
    if not by_row:
        return ["No routing_tables.json in this sweep's jobs: no heatmaps.", ""]
    layers = sorted({layer for tables in by_row.values() for layer in tables}, key=_natural)
    bound = math.log2(min(len(domains), _num_experts(by_row)))
    lines = [
        "Domain × expert heatmaps (one seed per router; the MI columns above average the per-seed MI). "
        f"MI is in bits: 0 = routing ignores the domain, {bound:.0f} = every domain has experts of its own.",
        "",
    ]
    for layer in layers:
        png = figures / f"{slug}_heatmap_{layer}.png"
        plot_heatmaps({label: t[layer] for label, t in by_row.items() if layer in t}, domains, layer, png)
        lines += [f"![{slug} domain × expert, {layer}]({figures.name}/{png.name})", ""]
    return lines


def _num_experts(by_row: dict[str, dict[str, torch.Tensor]]) -> int:
    return max(t.shape[1] for tables in by_row.values() for t in tables.values())


def plot_heatmaps(tables: dict[str, torch.Tensor], domains: list[str], layer: str, path: Path) -> bool:
    """One panel per router: each domain's share of its assignments per expert, on one colour scale."""
    plt = _pyplot()
    shares = {label: t / t.sum(1, keepdim=True).clamp_min(1) for label, t in tables.items()}
    vmax = max(float(s.max()) for s in shares.values()) or 1.0
    cols = min(3, len(tables))
    rows = math.ceil(len(tables) / cols)
    fig, axes = plt.subplots(
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
    return _save(fig, path, tight=False)


# ---------------------------------------------------------------------------------------------- page


EXTRA_SECTIONS: dict[str, Callable[[Sweep, str, Path], list[str]]] = {
    "fault_tolerance": fault_tolerance_section,
    "specialisation": specialisation_section,
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, tight: bool = True) -> bool:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return True


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


def write_results_page(root: Path, out: Path | None = None) -> Path:
    """Write `results.md` and `figures/` into `out` (default: the repo's docs/); returns the page path."""
    out = Path(out) if out is not None else DEFAULT_OUT
    figures = out / FIGURES_DIR
    figures.mkdir(parents=True, exist_ok=True)
    sweeps = sorted(
        (read_sweep(p) for p in find_sweep_dirs(Path(root))), key=lambda s: (s.experiment, str(s.path))
    )
    lines = [
        "# Results",
        "",
        f"Generated by `python eval.py report={root}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC from "
        f"{len(sweeps)} sweep(s); regenerate rather than edit. Each section names the command, seeds, scale, "
        "wall time and machine of its runs; missing or failed runs are listed in their section.",
        "",
        "Contents: "
        + ", ".join(
            f"[{title}](#{anchor(title)})" for title in map(section_title, sweeps, slugs_for(sweeps))
        ),
        "",
    ]
    notes = Path(root) / NOTES_FILE
    if notes.exists():  # the person who ran the sweeps says what they chose and why
        lines += [notes.read_text().strip(), ""]
    for sweep, slug in zip(sweeps, slugs_for(sweeps), strict=True):
        lines += sweep_section(sweep, slug, figures)
        log.info("%s: %d jobs from %s", sweep.experiment, len(sweep.runs), sweep.path)
    page = out / RESULTS_FILE
    page.write_text("\n".join(lines).rstrip() + "\n")
    return page
