"""Evaluate a run or compare sweeps: `python eval.py ckpt=<run dir>` / `compare=<multirun dir>` /
`report=<folder of sweeps> [out=<page.md>]`; `ckpt=<run dir> 'generate.prompt="def "'` also samples text."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import moe.engine.config  # noqa: F401  (registers the typed config schemas)
from moe.errors import PoimoeError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@hydra.main(version_base=None, config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    from moe.experiments.commands import evaluate_command  # imported here so `--help` stays fast

    try:
        results = evaluate_command(cfg, CONFIG_DIR)
    except PoimoeError as err:
        sys.exit(f"error: {err}")
    sample = results.pop("sample", None)
    for key, value in results.items():
        print(f"{key:40s} {value:.4f}" if isinstance(value, float) else f"{key:40s} {value}")
    if sample is not None:
        print(f"sample:\n{sample}")


if __name__ == "__main__":
    main()
