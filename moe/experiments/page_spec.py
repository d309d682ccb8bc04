"""What an experiment's section of the results page shows, as its experiment file declares it.

Each `configs/experiment/<name>.yaml` carries a `report:` block (typed by `ReportSpec`): which of the
standard columns to keep, extra columns (metric keys with a label, a format and how a run's value is
read), and optional special sections — a `gap_grid` (a metric over a grid of two config keys against
the baseline of one, with a claim to check), `routing_heatmaps` (domain × expert tables per row),
`detection` (audits), `fidelity_table` (PoI against exact Shapley values) and `tradeoff` (quality
against simulated time and compute cost, with the Pareto front).
The page reads the block from the experiment file when it renders, so a report can be refined without
re-running the sweep, and the library names no experiment.

Example:

    report:
      standard_columns: [val loss, tokens/s]
      columns:
        - {label: "rank e1", key: poi/rank/layer0/1, format: ".0f"}
        - {label: "MI {layer}", key: "routing/{layer}/domain_mi"}   # one column per MoE layer
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from moe.errors import ConfigError
from moe.experiments.columns import (
    COLUMNS,
    Column,
    FinalValue,
    last_logged,
    layer_names,
    mean_logged,
    plain_metric,
    share,
    summed,
)
from moe.experiments.detection import DetectionSpec
from moe.experiments.tradeoffs import TradeoffSpec
from router.typed_config import typed_config

log = logging.getLogger(__name__)

LAYER = "{layer}"  # in a column's label and key: one column per MoE layer


@dataclass
class ColumnSpec:
    label: str  # the column's title; `{layer}` is replaced by the layer's name
    key: str = ""  # the metric key (`{layer}` expands over the MoE layers the runs logged it for)
    keys: list[str] = field(default_factory=list)  # value=sum: the keys added up
    # final: summary.json's value, else the last logged one | mean: mean of every logged value |
    # sum: `keys` added up in the last event that has them all | share: `key` over the sum of its
    # siblings (the keys with the same prefix) in the last event that has it
    value: str = "final"
    format: str = ".3f"


@dataclass
class GapGridSpec:
    factor: str  # config key varied against its baseline (dotted, e.g. transport.network.default.drop_prob)
    by: str  # config key: each cell is compared with the baseline cell of the same `by` value
    factor_label: str = ""  # how the table, plot and verdict name the factor (default: the key)
    by_label: str = ""  # how they name `by` (default: the key)
    by_unit: str = ""  # printed after a `by` value in the plot's legend
    baseline: float = 0.0  # the factor value every cell is compared with
    claim: str = ""  # the claim the grid checks, in words (printed above the table)
    claim_at: float | None = None  # the factor value the verdict reads; None: no verdict
    within_percent: float = 5.0  # the verdict holds when the metric is at most this far above baseline
    metric: str = "val/loss"  # the final metric compared (from summary.json)
    metric_label: str = "val loss"
    throughput: str = ""  # a second final metric plotted beside it (log scale); empty: none
    throughput_label: str = ""
    note: str = ""  # printed under the table when the grid has several `by` values


@dataclass
class HeatmapSpec:
    panel_key: str = ""  # the override naming a row's panel (e.g. router); default: the row's overrides


@dataclass
class ReportSpec:
    # titles of the standard columns to keep, in order (None: all): val loss, bits/byte, load CV,
    # MaxVio, 1st-choice MaxVio, dropped %, tokens/s (as in comparison.md) and "MI {layer} (bits)"
    standard_columns: list[str] | None = None
    columns: list[ColumnSpec] = field(default_factory=list)  # added after the standard ones
    gap_grid: GapGridSpec | None = None
    routing_heatmaps: HeatmapSpec | None = None
    detection: DetectionSpec | None = (
        None  # audits: caught per behaviour and audit rate (moe/experiments/detection.py)
    )
    fidelity_table: bool = False  # PoI scorers against exact Shapley values (`poi.fidelity_every` runs)
    tradeoff: TradeoffSpec | None = (
        None  # quality against simulated time and cost (moe/experiments/tradeoffs.py)
    )


MI_COLUMN = ColumnSpec("MI {layer} (bits)", key="routing/{layer}/domain_mi")  # domain ↔ expert, per layer
VALUES = ("final", "mean", "sum", "share")


def load_report_spec(experiment_file: Path) -> ReportSpec:
    """The `report:` block of an experiment file; the defaults (standard columns) when it has none."""
    block = OmegaConf.load(experiment_file).get("report")
    return typed_config(ReportSpec, block or {}, f"{experiment_file.name}: report")


def columns_for(spec: ReportSpec, summaries: list[dict]) -> list[Column]:
    """The table's columns: the chosen standard ones, then the experiment's own, `{layer}` expanded
    over the MoE layers named in the runs' summaries."""
    standard = standard_columns(summaries)
    chosen = spec.standard_columns if spec.standard_columns is not None else list(standard)
    unknown = [title for title in chosen if title not in standard]
    if unknown:
        raise ConfigError(f"report.standard_columns: unknown {unknown}; valid: {list(standard)}")
    columns = [column for title in chosen for column in standard[title]]
    for i, column in enumerate(spec.columns):
        columns += expand(column, summaries, f"report.columns.{i}")
    return columns


def standard_columns(summaries: list[dict]) -> dict[str, list[Column]]:
    """Title → columns: the sweep comparison's columns, and the domain ↔ expert MI of every layer."""
    return {c.title: [c] for c in COLUMNS} | {MI_COLUMN.label: expand(MI_COLUMN, summaries)}


def expand(spec: ColumnSpec, summaries: list[dict], where: str = "report") -> list[Column]:
    """One column, or one per MoE layer when the key holds `{layer}` (none when no run logged it)."""
    if LAYER not in spec.key:
        return [Column(spec.label, final_value(spec, where), spec.format)]
    return [
        Column(spec.label.replace(LAYER, layer), final_value(spec, where, layer), spec.format)
        for layer in layer_names(summaries, spec.key)
    ]


def final_value(spec: ColumnSpec, where: str, layer: str = "") -> FinalValue:
    key = spec.key.replace(LAYER, layer)
    if spec.value not in VALUES:
        raise ConfigError(f"{where}.value: {spec.value!r} is not one of {', '.join(VALUES)}")
    if spec.value == "sum" and not spec.keys:
        raise ConfigError(f"{where}.keys: value=sum needs the keys to add up")
    if spec.value != "sum" and not key:
        raise ConfigError(f"{where}.key: value={spec.value} needs a metric key")
    if spec.value == "mean":
        return mean_logged(key)
    if spec.value == "sum":
        return last_logged(summed(list(spec.keys)))
    if spec.value == "share":
        return last_logged(share(key))
    return plain_metric(key)
