"""Train a decentralised MoE model: `python train.py [group=option ...] [key=value ...]`."""

import sys

import hydra
from omegaconf import DictConfig

import moe.engine.config  # noqa: F401  (registers the typed config schemas)
from moe.errors import PoimoeError


@hydra.main(version_base=None, config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    from moe.engine.loop import train  # imported here so `--help` and `--cfg` stay fast

    try:
        summary = train(cfg)
    except PoimoeError as err:
        sys.exit(f"error: {err}")
    print_summary(summary)
    return summary.get("val/loss", float("nan"))


def print_summary(summary: dict) -> None:
    from moe.incentives.poi import format_summary

    print(f"\nrun dir: {summary['run_dir']}")
    for key, value in summary.items():
        if key != "run_dir" and isinstance(value, float) and not key.startswith("poi/"):
            print(f"  {key:40s} {value:.4f}")
    for line in format_summary(summary):
        print(line)
    print_fidelity(summary["run_dir"])
    if "rewards" in summary:
        from moe.experiments.rewards_report import format_rewards

        print("\n".join(format_rewards(summary["rewards"])))


def print_fidelity(run_dir: str) -> None:
    """The PoI fidelity table, where the run measured it (`poi.fidelity_every`)."""
    from pathlib import Path

    from moe.engine.metrics import read_metrics
    from moe.experiments.poi_report import fidelity_table

    lines = fidelity_table([read_metrics(Path(run_dir))])
    if lines:
        print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
