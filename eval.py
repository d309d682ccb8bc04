"""Evaluate a run or compare a sweep: `python eval.py ckpt=<run dir>` / `python eval.py compare=<multirun dir>`."""

import sys

import hydra
from omegaconf import DictConfig

import moe.engine.config  # noqa: F401  (registers the typed config schemas)
from moe.errors import PoimoeError


@hydra.main(version_base=None, config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    from moe.engine.validation import main as evaluate_main

    try:
        results = evaluate_main(cfg)
    except PoimoeError as err:
        sys.exit(f"error: {err}")
    for key, value in results.items():
        print(f"{key:40s} {value:.4f}" if isinstance(value, float) else f"{key:40s} {value}")


if __name__ == "__main__":
    main()
