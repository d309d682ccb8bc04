"""PoI options: one dataclass per scorer (the single source of defaults and types), their checks, and
the registry by scorer name that Hydra's ConfigStore and `build_scorer` use."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from moe.errors import ConfigError
from router.typed_config import typed_choice

COUNTERFACTUALS = ("renormalized", "removed")
EVIDENCE_SCORERS = ("taylor", "gate")  # score from each training step's evidence; the others mask experts


@dataclass
class PoIConfig:
    """Options every scorer shares: the EMA, failures and bans, and the routing feedback."""

    name: str = MISSING
    every: int = 1  # a fresh view every N steps (the masking scorers: on an evaluation batch)
    ema_decay: float = 0.9  # score ← decay · score + (1 − decay) · view
    failure_penalty: float = 1.0  # a failed expert's view: −penalty × the layer's mean |contribution| in it
    feedback: float = 0.5  # selection-bias strength per unit of normalised per-token score; 0: off
    feedback_clip: float = 1.0  # |quality bias| ≤ clip, in logit units
    load_weight: float = 0.05  # step of the load price per step over (under) the bound; 0: no load term
    load_bound: float = 1.5  # no expert's load may exceed this × the mean load (the price enforces it)
    ban_after: int = 3  # consecutive failed steps before a ban; 0 never bans
    ban_steps: int = 10  # length of a first ban; doubles with every further ban (exponential back-off)
    ban_max_steps: int = 1000
    fidelity_every: int = 0  # every N steps, Spearman ρ of taylor, loo, gate vs shapley per layer; 0: off
    fidelity_samples: int = 16  # permutations of the Shapley reference in `fidelity`


@dataclass
class TaylorConfig(PoIConfig):
    name: str = "taylor"
    # renormalized: expand what loo measures (e's gate mass moves to the token's other experts);
    # removed: expand dropping e's gated output, first order −Σ⟨∂L/∂out, g·y⟩.
    counterfactual: str = "renormalized"
    curvature: bool = True  # add the second-order (sampled Fisher) term; false: first order only
    curvature_every: int = 10  # its extra backward runs every N scoring steps; the others reuse the last


@dataclass
class LooConfig(PoIConfig):
    name: str = "loo"
    every: int = 10
    ema_decay: float = 0.5  # views are ten times rarer than taylor's, so each moves the score more


@dataclass
class ShapleyConfig(PoIConfig):
    name: str = "shapley"
    every: int = 50
    ema_decay: float = 0.5  # rare views, as for loo
    samples: int = 16  # permutations (antithetic pairs: every second one is the previous reversed)
    truncation: float = 0.0  # stop a permutation once |L(S) − L(all)| ≤ truncation · |L(∅) − L(all)|


@dataclass
class ExactShapleyConfig(PoIConfig):
    name: str = "exact_shapley"
    every: int = 50
    ema_decay: float = 0.5  # rare views, as for loo


@dataclass
class TokenShapleyConfig(PoIConfig):
    name: str = "token_shapley"
    every: int = 50
    ema_decay: float = 0.5  # rare views, as for loo
    permutations: int = 2  # orders of each token's experts (an antithetic pair: exact for top-2 routing)


@dataclass
class GateConfig(PoIConfig):
    name: str = "gate"


_CONFIGS: dict[str, type[PoIConfig]] = {
    "taylor": TaylorConfig,
    "loo": LooConfig,
    "shapley": ShapleyConfig,
    "exact_shapley": ExactShapleyConfig,
    "token_shapley": TokenShapleyConfig,
    "gate": GateConfig,
}


def poi_configs() -> dict[str, type[PoIConfig]]:
    """Config dataclass per scorer name, for Hydra's ConfigStore."""
    return dict(_CONFIGS)


def typed_poi_config(cfg) -> PoIConfig:
    """The typed config of the scorer `cfg` names (a Hydra node, a mapping or a config dataclass),
    checked; an unknown name lists the valid ones."""
    cfg = typed_choice(_CONFIGS, cfg, "poi", "poi scorer")
    validate_poi_config(cfg)
    return cfg


def validate_poi_config(cfg: PoIConfig) -> None:
    """Fail on values no scorer can work with, naming the key."""
    rules = [
        (cfg.every >= 1, "every", "must be >= 1"),
        (0.0 <= cfg.ema_decay < 1.0, "ema_decay", "must be in [0, 1)"),
        (cfg.failure_penalty >= 0, "failure_penalty", "must be >= 0"),
        (cfg.feedback >= 0, "feedback", "must be >= 0"),
        (cfg.feedback_clip >= 0, "feedback_clip", "must be >= 0"),
        (cfg.load_weight >= 0, "load_weight", "must be >= 0"),
        (cfg.load_bound > 1.0, "load_bound", "must be > 1 (the mean load is 1)"),
        (cfg.ban_after >= 0, "ban_after", "must be >= 0"),
        (cfg.ban_steps >= 1 and cfg.ban_max_steps >= 1, "ban_steps/ban_max_steps", "must be >= 1"),
        (cfg.fidelity_every >= 0, "fidelity_every", "must be >= 0"),
        (cfg.fidelity_samples >= 1, "fidelity_samples", "must be >= 1"),
    ]
    if isinstance(cfg, TaylorConfig):
        rules.append((cfg.counterfactual in COUNTERFACTUALS, "counterfactual", f"valid: {COUNTERFACTUALS}"))
        rules.append((cfg.curvature_every >= 1, "curvature_every", "must be >= 1"))
    if isinstance(cfg, ShapleyConfig):
        rules.append((cfg.samples >= 1, "samples", "must be >= 1"))
        rules.append((cfg.truncation >= 0, "truncation", "must be >= 0"))
    if isinstance(cfg, TokenShapleyConfig):
        rules.append((cfg.permutations >= 1, "permutations", "must be >= 1"))
    for ok, key, rule in rules:
        if not ok:
            raise ConfigError(f"poi.{key} ({cfg.name}): {rule}")
