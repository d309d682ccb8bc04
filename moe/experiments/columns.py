"""Table columns of sweep reports: a title, a format and how to read one run's value from its
summary.json and logged events. The comparison's standard columns live here; experiment files add
their own through `moe.experiments.page_spec`, built from the value readers below. The causal column
reads the router registry's declaration (`declared_causality`).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from router.errors import ConfigError
from router.registry import lookup
from router.typed_config import typed_config

FinalValue = Callable[[dict | None, list[dict]], float | None]  # (summary or None, events) → value
EventValue = Callable[[dict], float | None]  # one logged event → value


@dataclass(frozen=True)
class Column:
    title: str
    final: FinalValue
    fmt: str


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def event_metric(key: str) -> EventValue:
    """`key`'s value in one event, when it is a finite number."""

    def value(event: dict) -> float | None:
        return float(event[key]) if is_number(event.get(key)) else None

    return value


def plain_metric(key: str) -> FinalValue:
    """Final value of `key`: summary.json's, else the last logged one."""

    def final(summary: dict | None, events: list[dict]) -> float | None:
        if summary is not None and is_number(summary.get(key)):
            return float(summary[key])
        return next((float(e[key]) for e in reversed(events) if is_number(e.get(key))), None)

    return final


def layer_mean(record: dict, name: str, prefix: str = "router/") -> float | None:
    """Mean over MoE layers of `<prefix><layer>/<name>` (or a layerless `<prefix><name>`) in one record."""
    pattern = re.compile(rf"^{re.escape(prefix)}(?:[^/]+/)?{re.escape(name)}$")
    values = [float(v) for k, v in record.items() if pattern.match(k) and is_number(v)]
    return statistics.fmean(values) if values else None


def router_metric(name: str, scale: float = 1.0, prefix: str = "val/router/") -> FinalValue:
    """Final layer-mean of a routing metric, by default the evaluation-mode one pooled over the validation
    set: summary.json's if it has one, else the last logged event's (none for runs that never logged it)."""

    def final(summary: dict | None, events: list[dict]) -> float | None:
        for record in [summary or {}, *reversed(events)]:
            value = layer_mean(record, name, prefix)
            if value is not None:
                return value * scale
        return None

    return final


def mean_logged(key: str) -> FinalValue:
    """Mean of every logged value of `key` (a measurement repeated during training)."""

    def final(summary: dict | None, events: list[dict]) -> float | None:
        values = [float(e[key]) for e in events if is_number(e.get(key))]
        return statistics.fmean(values) if values else None

    return final


def last_logged(value_of: EventValue) -> FinalValue:
    """A value computed from the last logged event that has it."""

    def final(summary: dict | None, events: list[dict]) -> float | None:
        return next((v for e in reversed(events) if (v := value_of(e)) is not None), None)

    return final


def summed(keys: list[str]) -> EventValue:
    """The sum of `keys` in one event, when it has all of them."""

    def total(event: dict) -> float | None:
        return sum(event[k] for k in keys) if all(is_number(event.get(k)) for k in keys) else None

    return total


def share(key: str) -> EventValue:
    """`key`'s share of the sum over its siblings (the keys with the same `a/b/` prefix) in one event."""
    prefix = key.rsplit("/", 1)[0] + "/"

    def fraction(event: dict) -> float | None:
        siblings = {k: v for k, v in event.items() if k.startswith(prefix) and is_number(v)}
        total = sum(siblings.values())
        return siblings[key] / total if key in siblings and total > 0 else None

    return fraction


def layer_names(summaries: list[dict], key_pattern: str) -> list[str]:
    """The MoE layers named in the summaries' keys, for a pattern like `routing/{layer}/domain_mi`."""
    before, after = (re.escape(part) for part in key_pattern.split("{layer}", 1))
    pattern = re.compile(f"^{before}([^/]+){after}$")
    names = {m.group(1) for summary in summaries for k in summary if (m := pattern.match(k))}
    return sorted(names, key=natural_key)


def natural_key(text: str) -> list:
    """Sort key that orders `layer10` after `layer2`."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(text))]


COLUMNS = [
    Column("val loss", plain_metric("val/loss"), ".4f"),
    Column("bits/byte", plain_metric("val/bpb"), ".4f"),
    Column("load CV", router_metric("load_cv"), ".3f"),
    Column("MaxVio", router_metric("max_vio"), ".3f"),
    Column("1st-choice MaxVio", router_metric("first_choice_max_vio"), ".3f"),
    Column("dropped %", router_metric("dropped_frac", scale=100.0), ".2f"),
    Column("tokens/s", plain_metric("perf/tokens_per_s"), ".0f"),
]


# ---------------------------------------------------------------------------------------------- causality

# (causal in training, causal at evaluation) → the table's word; see `Router` for what causal means.
CAUSALITY_LABELS = {
    (True, True): "yes",
    (False, True): "eval only",
    (True, False): "training only",
    (False, False): "no",
}
CAUSALITY_NOTE = (
    "Causal: whether a token's routing ignores the later tokens of its own sequence, as a decoder "
    "generating text needs (the router's declaration, tested in tests/router/test_causality.py); "
    "'eval only': routing looks ahead while training (batch-level balancing) but not at evaluation; "
    "'no': it looks ahead at evaluation too, so the val loss is not a causal LM's loss. Causal val loss: "
    "where evaluation routing looks ahead, every val token scored from the model run on its own prefix "
    "alone, as generation sees it (prefix evaluation, moe/experiments/prefix_eval.py; cached in each "
    "run's causal_eval.json); '= val loss' where evaluation routing is causal, so the val loss already "
    "is a causal LM's; routers whose choices depend on the batch (capacity drops, random draws) can "
    "still score one sequence alone differently, e.g. a short prefix overflows a capacity buffer sooner."
)


def declared_causality(router_node: Mapping | None) -> tuple[bool, bool] | None:
    """(causal in training, causal at evaluation) of the router a run's config `router` node describes,
    as its strategy declares it; None when the node names no known router.

    Options that cannot be read (unresolved interpolations, wrong types) fall back to the defaults;
    the options that change causality (gshard `order`, base `eval_routing`) are plain strings.
    """
    if not router_node or not isinstance(router_node.get("name"), str):
        return None
    try:
        strategy = lookup(router_node["name"])
    except ConfigError:
        return None
    options = {k: v for k, v in router_node.items() if not (isinstance(v, str) and "${" in v)}
    try:
        config = typed_config(strategy.config_cls, options, "router")
    except ConfigError:
        config = typed_config(strategy.config_cls, {"name": strategy.name}, "router")
    return strategy.factory.causal_for(config, True), strategy.factory.causal_for(config, False)


def causality_label(router_node: Mapping | None) -> str:
    """The table's word for the declared causality of a run's router ('?' when unknown)."""
    declared = declared_causality(router_node)
    return "?" if declared is None else CAUSALITY_LABELS[declared]
