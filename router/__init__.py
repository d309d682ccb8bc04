"""How tokens choose experts: strategies by registry name, all returning a `DispatchPlan`."""

from router import (  # noqa: F401  (importing a strategy module registers it)
    base_layers,
    bias_balanced,
    expert_choice,
    gshard,
    hash,
    random,
    sinkhorn,
    switch,
    topk,
)
from router.plan import DispatchPlan, build_plan, routing_metrics
from router.registry import RouterConfig, build, lookup, names, register, strategies

__all__ = [
    "DispatchPlan",
    "RouterConfig",
    "build",
    "build_plan",
    "lookup",
    "names",
    "register",
    "routing_metrics",
    "strategies",
]
