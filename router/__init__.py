"""How tokens choose experts: strategies by registry name, all returning a `DispatchPlan`."""

from router import topk  # noqa: F401  (registers the strategy)
from router.plan import DispatchPlan, build_plan, routing_metrics
from router.registry import RouterConfig, build, build_from_config, lookup, names, register, strategies

__all__ = [
    "DispatchPlan",
    "RouterConfig",
    "build",
    "build_from_config",
    "build_plan",
    "lookup",
    "names",
    "register",
    "routing_metrics",
    "strategies",
]
