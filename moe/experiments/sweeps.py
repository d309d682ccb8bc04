"""Reading Hydra multirun dirs for the results page: each sweep's jobs, configs, run info, and the
facts its section states (command, seeds, scale, wall time, machine, jobs that never started).

A sweep dir holds numbered job dirs (`0/`, `1/`, ...) with `.hydra/`; `multirun.yaml` beside them
holds the command's overrides and the sweeper's parameters, `run_info.json` in each job the resolved
config and the machine. Anything missing or unreadable is reported as unknown, never guessed.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from moe.engine.run_info import RUN_INFO_FILE
from moe.errors import DataError
from moe.experiments.columns import is_number, natural_key
from moe.experiments.comparison import OVERRIDES_FILE, JobRun, group_rows, read_job, split_override

log = logging.getLogger(__name__)

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
    """A sweep dir's jobs, configs and run info, and the experiment they ran."""
    jobs = sorted((p for p in path.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    runs = [read_job(job) for job in jobs]
    sweep = Sweep(path=path, experiment="", runs=runs)
    for job in jobs:
        info = read_yaml(job / RUN_INFO_FILE)
        if info:
            sweep.run_infos[job.name] = info
        config = (info or {}).get("config") or read_yaml(job / ".hydra" / "config.yaml")
        if config:
            sweep.configs[job.name] = config
    multirun = read_yaml(path / "multirun.yaml") or {}
    hydra = multirun.get("hydra") or {}
    sweep.task_overrides = [str(o) for o in ((hydra.get("overrides") or {}).get("task") or [])]
    sweep.expected_jobs = expected_job_count(sweep.task_overrides, (hydra.get("sweeper") or {}).get("params"))
    sweep.experiment = experiment_name(sweep)
    return sweep


def read_yaml(path: Path) -> dict | None:
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
    return experiment_override(sweep) or sweep.path.name


def experiment_override(sweep: Sweep) -> str | None:
    """The `experiment=<file>` the jobs or the command named, if any."""
    overrides = [o for r in sweep.runs for o in r.overrides] + sweep.task_overrides
    return next((v for k, v in map(split_override, overrides) if k == "experiment"), None)


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
    seeds = sorted({str(c.get("seed")) for c in sweep.configs.values() if "seed" in c}, key=natural_key)
    return ", ".join(seeds) or "unknown"


def scale_line(sweep: Sweep) -> str:
    """The settings that set the compute of a job, with every value the jobs used."""
    parts = []
    for key in SCALE_KEYS:
        values = sorted({str(dotted_get(c, key)) for c in sweep.configs.values()} - {"None"}, key=natural_key)
        if values:
            parts.append(f"{key}={'/'.join(values)}")
    return ", ".join(parts) or "unknown (no run_info.json)"


def dotted_get(config: dict, dotted: str):
    """`config[a][b][c]` for `a.b.c`; None when a part is missing."""
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
