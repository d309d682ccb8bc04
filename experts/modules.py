"""Expert modules: feed-forward networks that may differ in size from expert to expert.

Legend: a one expert's rows (assignments routed to it), D model width, F hidden width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from experts.errors import ConfigError
from experts.owner import OptimizerSettings
from experts.rows import ComputeSettings


class FFN(nn.Module):
    """Two-layer MLP with GELU, or a SwiGLU gated unit (Shazeer 2020)."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown experts.activation '{activation}'; valid: {', '.join(ACTIVATIONS)}")
        self.activation = activation
        width_in = 2 * d_ff if activation == "swiglu" else d_ff
        self.w_in = nn.Linear(d_model, width_in, bias=False)
        self.w_out = nn.Linear(d_ff, d_model, bias=False)
        nn.init.normal_(self.w_in.weight, std=d_model**-0.5)
        nn.init.normal_(self.w_out.weight, std=d_ff**-0.5 / 2)

    def forward(self, x_aD: torch.Tensor) -> torch.Tensor:
        h_aF = ACTIVATIONS[self.activation](self.w_in(x_aD))
        return self.w_out(h_aF)


def _swiglu(h_a2F: torch.Tensor) -> torch.Tensor:
    gate_aF, value_aF = h_a2F.chunk(2, dim=-1)
    return F.silu(gate_aF) * value_aF


ACTIVATIONS = {"gelu": F.gelu, "swiglu": _swiglu}


@dataclass
class ExpertsConfig(ComputeSettings, OptimizerSettings):
    """Per-layer experts: how many, their size, the owner's optimizer (each expert has its own) and how
    owners compute their rows. The config is its own `OptimizerSettings` (`lr`, `weight_decay`,
    `grad_clip`, inherited) and `ComputeSettings` (`row_buckets`)."""

    num: int = 8
    d_ff: int = 256
    d_ff_per_expert: list[int] | None = None  # heterogeneous sizes; overrides d_ff when given
    activation: str = "gelu"
    behaviours: dict[int, str] = field(
        default_factory=dict
    )  # expert index -> behaviour spec (experts/behaviours.py)


def expert_widths(cfg: ExpertsConfig) -> list[int]:
    if cfg.d_ff_per_expert is None:
        return [cfg.d_ff] * cfg.num
    if len(cfg.d_ff_per_expert) != cfg.num:
        raise ConfigError(
            f"experts.d_ff_per_expert has {len(cfg.d_ff_per_expert)} entries but experts.num={cfg.num}"
        )
    return list(cfg.d_ff_per_expert)


def build_experts(cfg: ExpertsConfig, d_model: int) -> list[FFN]:
    if cfg.num < 1:
        raise ConfigError(f"experts.num={cfg.num} must be at least 1")
    return [FFN(d_model, width, cfg.activation) for width in expert_widths(cfg)]


def expert_spec(module: nn.Module, index: int) -> dict:
    """What a worker needs to build the same module (its parameters travel separately)."""
    if type(module) is not FFN:
        raise ConfigError(f"transport=process hosts FFN experts; expert {index} is a {type(module).__name__}")
    return {
        "kind": "ffn",
        "d_model": module.w_in.in_features,
        "d_ff": module.w_out.in_features,
        "activation": module.activation,
    }


def build_expert(spec: dict) -> FFN:
    """The module `spec` describes (the inverse of `expert_spec`), with fresh parameters."""
    if spec.get("kind") != "ffn":
        raise ConfigError(f"unknown expert kind {spec.get('kind')!r}")
    return FFN(int(spec["d_model"]), int(spec["d_ff"]), str(spec.get("activation", "gelu")))
