"""What `eval.py` runs: a run report (`ckpt=`, with a text sample when `generate.prompt` is set), a sweep
comparison (`compare=`) or the results page (`report=`). Returns the metrics, paths and text the command
line prints."""

from __future__ import annotations

from pathlib import Path

from moe.errors import ConfigError


def evaluate_command(cfg, config_dir: Path) -> dict:
    """`report=<folder of sweeps>` → `<folder>/results.md` + `figures/` (or the page `out` names);
    `compare=<multirun dir>` → comparison.md in it; `ckpt=<run>` → report.md + plots in the run dir
    (or `out`), after sampling text into it when `generate.prompt` is set. `config_dir` holds
    `experiment/<name>.yaml`, whose `report:` blocks shape the page."""
    if cfg.generate.prompt is not None and (cfg.report or cfg.compare or not cfg.ckpt):
        raise ConfigError("generate.prompt samples from one run: pass it with ckpt=<run dir> alone")
    if cfg.report:
        from moe.experiments.results_page import write_results_page

        out = Path(cfg.out) if cfg.out else None
        return {"results": str(write_results_page(Path(cfg.report), out, Path(config_dir) / "experiment"))}
    if cfg.compare:
        from moe.experiments.comparison import compare_sweep

        return {"comparison": str(compare_sweep(Path(cfg.compare)))}
    if not cfg.ckpt:
        raise ConfigError(
            "nothing to evaluate: pass ckpt=<run dir or checkpoint file> (or compare=, report=)"
        )
    from moe.experiments.run_report import write_run_report

    sample = {}
    if cfg.generate.prompt is not None:
        from moe.experiments.generation import generate_sample, printable

        sample = {"sample": printable(generate_sample(cfg.ckpt, cfg.generate, out_dir=cfg.out)[0].text)}
    return write_run_report(cfg.ckpt, out_dir=cfg.out, num_val_batches=cfg.num_val_batches) | sample
