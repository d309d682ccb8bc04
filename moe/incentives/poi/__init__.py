"""Proof-of-Intelligence: score every expert by how much it lowers the loss, and feed the score back.

An expert's contribution is L(without e) − L(with all): positive means helpful. Scorers by registry
name (`poi=taylor|loo|shapley|gate`), each with a typed config (`config`):

- `taylor` (nearly free): a Taylor estimate from this step's layer evidence (each
  assignment's gated output and the loss gradient at the layer output); no extra forward pass. The
  first-order term alone vanishes at convergence (every learned direction, e.g. an expert's output
  scale, is stationary there), so a second-order term is added: ½ δᵀ(Gauss-Newton)δ, estimated from
  one extra backward to the layer outputs of the loss against targets sampled from the model itself
  (a Monte-Carlo Fisher), every `poi.curvature_every` steps (`evidence`).
- `loo`: exact leave-one-out on an evaluation batch every `poi.every` steps (`views`).
- `shapley`: truncated Monte-Carlo permutation Shapley values over a layer's experts (costly).
- `exact_shapley`: Shapley values from all 2^E coalitions: the reference of `fidelity` (2^E forwards).
- `token_shapley` (default): per-token Shapley values (`shapley`): every token's own experts added in a random
  order and its reverse, all tokens at once; exact where nothing after the layer mixes tokens and k = 2,
  at 2 + permutations·(k − 1) forwards per layer.
- `gate`: mean gate mass per expert; not loss based, the baseline the others must beat.

"Without e" means one thing everywhere: e counts as not answering, so `combine` drops its assignments
and rescales each token's remaining gates to the token's gate mass, exactly the path a real failure
takes. `loo` and `shapley` get there by masking experts in each layer's side pass
(`MoELayer.side_pass`); `taylor` linearises the same counterfactual (or, with
`counterfactual: removed`, plain removal).

`PoIScorer` (`scorer`) keeps per layer and expert an EMA of contributions, failure counts and bans,
and writes a selection-only bias into each layer (`feedback`): clipped quality feedback, minus a load
price that keeps every expert's load under `poi.load_bound` × the mean, and a large negative bias for
banned experts. Failures (answered False) earn nothing and score a penalty.
"""

from moe.incentives.poi.config import (
    ExactShapleyConfig,
    GateConfig,
    LooConfig,
    PoIConfig,
    ShapleyConfig,
    TaylorConfig,
    TokenShapleyConfig,
    poi_configs,
    typed_poi_config,
    validate_poi_config,
)
from moe.incentives.poi.feedback import BAN_BIAS
from moe.incentives.poi.fidelity import fidelity, spearman
from moe.incentives.poi.scorer import PoIScorer, build_scorer, format_summary
from moe.incentives.poi.views import LayerView, views_on_batch

__all__ = [
    "BAN_BIAS",
    "ExactShapleyConfig",
    "GateConfig",
    "LayerView",
    "LooConfig",
    "PoIConfig",
    "PoIScorer",
    "ShapleyConfig",
    "TaylorConfig",
    "TokenShapleyConfig",
    "build_scorer",
    "fidelity",
    "format_summary",
    "poi_configs",
    "spearman",
    "typed_poi_config",
    "validate_poi_config",
    "views_on_batch",
]
