"""Proof-of-Intelligence: score every expert by how much it lowers the loss, and feed the score back.

An expert's contribution is L(without e) − L(with all): positive means helpful. Scorers by registry
name (`poi=taylor|loo|shapley|gate`), each with a typed config:

- `taylor` (default, nearly free): a Taylor estimate from this step's layer evidence (each
  assignment's gated output and the loss gradient at the layer output); no extra forward pass. The
  first-order term alone vanishes at convergence (every learned direction, e.g. an expert's output
  scale, is stationary there), so a second-order term is added: ½ δᵀ(Gauss-Newton)δ, estimated from
  one extra backward to the layer outputs of the loss against targets sampled from the model itself
  (a Monte-Carlo Fisher), every `poi.curvature_every` steps.
- `loo`: exact leave-one-out on an evaluation batch every `poi.every` steps.
- `shapley`: truncated Monte-Carlo permutation Shapley values over a layer's experts (for fidelity
  studies; costly).
- `gate`: mean gate mass per expert; not loss based, the baseline the others must beat.

"Without e" means one thing everywhere: e counts as not answering, so `combine` drops its assignments
and rescales each token's remaining gates to the token's gate mass, exactly the path a real failure
takes. `loo` and `shapley` get there by wrapping each layer's pool in a `MaskablePool`; `taylor`
linearises the same counterfactual (or, with `counterfactual: removed`, plain removal).

`PoIScorer` keeps per layer and expert an EMA of contributions, failure counts and bans, and writes a
selection-only bias into each layer's `selection_bias_E`: clipped quality feedback, minus a load
price that keeps every expert's load under `poi.load_bound` × the mean, and a large negative bias for
banned experts. Failures (answered False) earn nothing and score a penalty.

Legend: N tokens, D model width, E experts, A assignments sorted by expert, B examples, T time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from omegaconf import MISSING, DictConfig, OmegaConf

from experts.pool import PoolOutput
from moe.errors import ConfigError
from moe.nn.layer import LayerEvidence, MoELayer, renormalize_over_answered

log = logging.getLogger(__name__)

BAN_BIAS = -1.0e4  # selection bias of a banned expert: never in any token's top-k, yet finite (no NaN)
COUNTERFACTUALS = ("renormalized", "removed")


# ---------------------------------------------------------------------------------------------- configs


@dataclass
class PoIConfig:
    """Options every scorer shares: the EMA, failures and bans, and the routing feedback."""

    name: str = MISSING
    every: int = 1  # a fresh view every N steps (loo and shapley: on an evaluation batch)
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


@dataclass
class ShapleyConfig(PoIConfig):
    name: str = "shapley"
    every: int = 50
    samples: int = 16  # permutations (antithetic pairs: every second one is the previous reversed)
    truncation: float = 0.0  # stop a permutation once |L(S) − L(all)| ≤ truncation · |L(∅) − L(all)|


@dataclass
class GateConfig(PoIConfig):
    name: str = "gate"


def check_config(cfg: PoIConfig) -> None:
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
    for ok, key, rule in rules:
        if not ok:
            raise ConfigError(f"poi.{key} ({cfg.name}): {rule}")


# ---------------------------------------------------------------------------------------------- taylor and gate


def assignment_weights(evidence: LayerEvidence) -> torch.Tensor:
    """The weight `combine` gave each assignment: its gate, renormalised over the experts that answered."""
    plan = evidence.plan
    answered_A = evidence.answered_E[plan.expert_idx]
    with torch.no_grad():
        if bool(answered_A.all()):
            return plan.gate.detach().float()
        return renormalize_over_answered(plan, answered_A).detach().float()


def removal_dots(evidence: LayerEvidence, h_ND: torch.Tensor, counterfactual: str) -> torch.Tensor:
    """⟨h_t, δ_a⟩ for every assignment a of token t [A], δ_a the change of the layer output at t when
    a's expert is removed.

    With output o_t = Σ_a w_a·y_a and gate mass W_t, renormalised removal gives
    δ_a = (w_a·o_t − W_t·w_a·y_a) / (W_t − w_a), and −w_a·y_a when a was the token's only expert
    (always, with `counterfactual="removed"`). Only dot products are formed, never δ itself.
    """
    token_A = evidence.plan.token_idx
    dot_A = (h_ND[token_A] * evidence.gated_AD).sum(-1)  # ⟨h_t, w_a·y_a⟩
    if counterfactual == "removed":
        return -dot_A
    num_tokens = evidence.plan.num_tokens
    weight_A = assignment_weights(evidence).to(dot_A.device)
    mass_A = weight_A.new_zeros(num_tokens).index_add_(0, token_A, weight_A)[token_A]
    output_dot_A = dot_A.new_zeros(num_tokens).index_add_(0, token_A, dot_A)[token_A]  # ⟨h_t, o_t⟩
    rest_A = mass_A - weight_A
    shared_A = rest_A > 1e-6 * mass_A
    moved_A = (weight_A * output_dot_A - mass_A * dot_A) / torch.where(shared_A, rest_A, 1.0)
    return torch.where(shared_A, moved_A, -dot_A)


@dataclass
class Curvature:
    """Gradients at the layer outputs of the loss against targets sampled from the model itself.

    For such targets E[ĝ ĝᵀ] per example is the Gauss-Newton matrix of the example's loss divided by
    `scale` (the number of independent terms the loss averages), so ½·scale·B·Σ_b ⟨ĝ_b, δ_b⟩² is an
    unbiased estimate of the second-order term ½ δᵀHδ of the batch-mean loss.
    """

    grad_ND: dict[str, torch.Tensor]
    scale: float
    examples: int


def taylor_contributions(
    evidence: LayerEvidence,
    counterfactual: str = "renormalized",
    curvature_grad_ND: torch.Tensor | None = None,
    scale: float = 1.0,
    examples: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Taylor estimate of L(without e) − L(all) per expert: (first-order term [E], second-order term [E]
    or None without a curvature gradient). Both in units of the batch-mean loss."""
    plan = evidence.plan
    first_E = torch.zeros(plan.num_experts)
    if evidence.grad_out_ND is None or plan.token_idx.numel() == 0:
        return first_E, None
    expert_A = plan.expert_idx
    first_E.index_add_(0, expert_A.cpu(), removal_dots(evidence, evidence.grad_out_ND, counterfactual).float().cpu())
    if curvature_grad_ND is None:
        return first_E, None
    q_A = removal_dots(evidence, curvature_grad_ND, counterfactual)
    example_A = plan.token_idx // max(plan.num_tokens // examples, 1)
    q_BE = q_A.new_zeros(examples * plan.num_experts).index_add_(0, example_A * plan.num_experts + expert_A, q_A)
    second_E = 0.5 * scale * examples * q_BE.view(examples, plan.num_experts).square().sum(0)
    return first_E, second_E.float().cpu()


def gate_mass(evidence: LayerEvidence) -> torch.Tensor:
    """Mean gate mass per token each expert carried [E] (after renormalising over the answered)."""
    plan = evidence.plan
    weight_A = assignment_weights(evidence).cpu()
    return torch.zeros(plan.num_experts).index_add_(0, plan.expert_idx.cpu(), weight_A) / max(plan.num_tokens, 1)


def sampled_targets(task: str, pred: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """Targets drawn from the model's own predictive distribution, and the Fisher `scale`.

    Must match `MoEModel.loss_per_example`: for the byte LM (mean cross-entropy over T positions) a
    byte per position from softmax(logits), scale T; for regression (mean squared error over O
    outputs, i.e. a Gaussian of variance O/2) pred + N(0, O/2), scale 1.
    """
    pred = pred.detach().float()
    if task == "lm":
        probs_MV = pred.reshape(-1, pred.shape[-1]).softmax(-1)
        targets = torch.multinomial(probs_MV.cpu(), 1, generator=generator).view(pred.shape[:-1])
        return targets.to(pred.device), float(pred.shape[1])
    noise = torch.randn(pred.shape, generator=generator).to(pred.device)
    return pred + math.sqrt(pred.shape[-1] / 2) * noise, 1.0


def repeatable_layers(layers: list[MoELayer]) -> list[MoELayer]:
    """Layers whose output gradient may be taken besides the training backward: every pool after them
    can backpropagate input gradients only (`ExpertPool.repeatable_backward`). A pool that cannot (its
    backward would consume its kept forward and add to its owners' gradients) hides the layers before it."""
    return [
        layer
        for i, layer in enumerate(layers)
        if all(getattr(later.pool, "repeatable_backward", False) for later in layers[i + 1 :])
    ]


@contextmanager
def input_gradients_only(layers: list[MoELayer]) -> Iterator[None]:
    """Backward passes inside only ask the pools for input gradients (see `ExpertPool`)."""
    with ExitStack() as stack:
        for layer in layers:
            stack.enter_context(layer.pool.only_input_gradients())
        yield


def curvature_at_outputs(
    model, pred: torch.Tensor, outputs: dict[str, torch.Tensor], generator: torch.Generator
) -> Curvature | None:
    """One backward, to the MoE layer outputs only (no parameter's `.grad` changes), of the loss
    against sampled targets; the graph is kept for the training backward that follows."""
    layers = [layer for layer in repeatable_layers(model.moe_layers()) if layer.name in outputs]
    wanted = [layer for layer in layers if outputs[layer.name].requires_grad]
    if not wanted:
        return None
    targets, scale = sampled_targets(model.task, pred, generator)
    loss = model.loss_per_example(pred, targets).mean()
    with input_gradients_only(model.moe_layers()):
        grads = torch.autograd.grad(
            loss, [outputs[layer.name] for layer in wanted], retain_graph=True, allow_unused=True
        )
    grad_ND = {
        layer.name: grad.detach().reshape(-1, grad.shape[-1]).float()
        for layer, grad in zip(wanted, grads, strict=True)
        if grad is not None
    }
    return Curvature(grad_ND, scale, examples=pred.shape[0])


def failed_in(evidence: LayerEvidence) -> torch.Tensor:
    return ~evidence.answered_E.detach().cpu()


@contextmanager
def evaluation_mode(model) -> Iterator[None]:
    """Evaluation-mode passes that leave no trace: the training mode and each layer's `last_plan`
    (which the trainer's routing metrics read after scoring) are put back afterwards."""
    was_training = model.training
    last_plans = [(layer, layer.last_plan) for layer in model.moe_layers()]
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        for layer, plan in last_plans:
            layer.last_plan = plan


def output_keeper(outputs: dict[str, torch.Tensor]) -> Callable:
    """A forward hook for MoE layers that stores each grad-enabled output in `outputs` by layer name."""

    def keep(module, args, out) -> None:
        if torch.is_grad_enabled():
            outputs[module.name] = out[0]

    return keep


@contextmanager
def captured_outputs(layers: list[MoELayer]) -> Iterator[dict[str, torch.Tensor]]:
    """Each layer's output tensor from grad-enabled forwards, by layer name, while inside."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(output_keeper(outputs)) for layer in layers]
    try:
        yield outputs
    finally:
        for hook in hooks:
            hook.remove()


def on_model_device(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    return batch.inputs.to(device), batch.targets.to(device)


def evidence_pass(
    model, batch, *, with_grad: bool, generator: torch.Generator | None = None
) -> tuple[dict[str, LayerEvidence], Curvature | None]:
    """One evaluation-mode forward on `batch` leaving each layer's evidence; with `with_grad` also the
    loss gradient at each layer output and, given a `generator`, the curvature gradients. Gradients
    stop at the layer outputs, so no parameter's `.grad` changes."""
    layers = model.moe_layers()
    kept = [layer.keep_evidence for layer in layers]
    curvature = None
    try:
        for layer in layers:
            layer.keep_evidence = True
        with evaluation_mode(model), torch.enable_grad(), captured_outputs(layers) as outputs:
            inputs, targets = on_model_device(model, batch)
            pred, _ = model(inputs)
            if with_grad:
                if generator is not None:
                    curvature = curvature_at_outputs(model, pred, outputs, generator)
                attach_output_grads(model.loss_per_example(pred, targets).mean(), model, outputs)
    finally:
        for layer, keep in zip(layers, kept, strict=True):
            layer.keep_evidence = keep
    return {layer.name: layer.evidence for layer in layers}, curvature


def attach_output_grads(loss: torch.Tensor, model, outputs: dict[str, torch.Tensor]) -> None:
    wanted = [layer for layer in repeatable_layers(model.moe_layers()) if outputs[layer.name].requires_grad]
    with input_gradients_only(model.moe_layers()):
        grads = torch.autograd.grad(loss, [outputs[layer.name] for layer in wanted], allow_unused=True)
    for layer, grad_BTD in zip(wanted, grads, strict=True):
        if grad_BTD is not None:
            layer.evidence.grad_out_ND = grad_BTD.detach().reshape(-1, grad_BTD.shape[-1]).float()


# ---------------------------------------------------------------------------------------------- counterfactual passes


class MaskablePool:
    """A layer's pool for counterfactual passes: experts outside `keep_E` count as not answering, so
    `combine` drops their assignments and renormalises the token's remaining gates, as for a real
    failure. The first call's outputs are cached and reused while the layer sees the same inputs, so
    a pass that masks one layer recomputes experts only in the layers after it."""

    def __init__(self, pool):
        self.pool = pool
        self.num_experts = pool.num_experts
        self.keep_E: torch.Tensor | None = None
        self.baseline: tuple[torch.Tensor, torch.Tensor, PoolOutput] | None = None

    def __call__(self, x_AD: torch.Tensor, plan, step: int = 0) -> PoolOutput:
        output = self._cached(x_AD, plan)
        if output is None:
            output = self.pool(x_AD, plan, step)
            if self.baseline is None:
                self.baseline = (x_AD, plan.counts, output)
        if self.keep_E is None:
            return output
        return PoolOutput(output.y_AD, output.answered_E & self.keep_E.to(output.answered_E.device))

    def _cached(self, x_AD: torch.Tensor, plan) -> PoolOutput | None:
        if self.baseline is None:
            return None
        x_seen, counts_seen, output = self.baseline
        same = x_AD.shape == x_seen.shape and torch.equal(plan.counts, counts_seen) and torch.equal(x_AD, x_seen)
        return output if same else None

    def observed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(failed_E, had_tokens_E) in the unmasked pass."""
        if self.baseline is None:
            nothing_E = torch.zeros(self.num_experts, dtype=torch.bool)
            return nothing_E, nothing_E
        _, counts_E, output = self.baseline
        return ~output.answered_E.cpu(), counts_E.cpu() > 0


@contextmanager
def maskable_pools(layers: list[MoELayer]) -> Iterator[dict[str, MaskablePool]]:
    """Swap every layer's pool for a `MaskablePool` for the duration, then put the real pools back."""
    originals = {layer.name: layer.pool for layer in layers}
    wrappers = {layer.name: MaskablePool(layer.pool) for layer in layers}
    try:
        for layer in layers:
            layer.pool = wrappers[layer.name]
        yield wrappers
    finally:
        for layer in layers:
            layer.pool = originals[layer.name]


@torch.no_grad()
def batch_loss(model, batch) -> float:
    inputs, targets = on_model_device(model, batch)
    pred, _ = model(inputs)
    return float(model.loss_per_example(pred, targets).mean())


def coalition_loss(model, batch, pool: MaskablePool) -> Callable[[torch.Tensor], float]:
    """L(coalition) on `batch` with only the experts in `keep_E` answering in `pool`'s layer; memoised."""
    memo: dict[tuple[bool, ...], float] = {}

    def loss_of(keep_E: torch.Tensor) -> float:
        key = tuple(keep_E.tolist())
        if key not in memo:
            pool.keep_E = keep_E.clone()
            try:
                memo[key] = batch_loss(model, batch)
            finally:
                pool.keep_E = None
        return memo[key]

    return loss_of


def leave_one_out(loss_of: Callable[[torch.Tensor], float], num_experts: int) -> torch.Tensor:
    """L(all but e) − L(all) for every expert [E]."""
    everyone_E = torch.ones(num_experts, dtype=torch.bool)
    full = loss_of(everyone_E)
    contribution_E = torch.zeros(num_experts, dtype=torch.float64)
    for e in range(num_experts):
        keep_E = everyone_E.clone()
        keep_E[e] = False
        contribution_E[e] = loss_of(keep_E) - full
    return contribution_E.float()


def permutation_shapley(
    loss_of: Callable[[torch.Tensor], float],
    num_experts: int,
    samples: int,
    generator: torch.Generator,
    truncation: float = 0.0,
) -> torch.Tensor:
    """Monte-Carlo permutation Shapley values [E] of the game v(S) = −L(S) (Castro et al. 2009).

    Each permutation adds experts one at a time and credits each with L(before) − L(after); every
    second permutation is the previous one reversed (antithetic pairs halve the variance for
    near-additive games). Without truncation the credits of a permutation telescope to
    L(∅) − L(all), so Σ_e φ_e matches it exactly; with `truncation` > 0 a permutation stops once
    L(S) is within truncation · |L(∅) − L(all)| of L(all) (TMC-Shapley, Ghorbani & Zou 2019).
    """
    everyone_E = torch.ones(num_experts, dtype=torch.bool)
    full, empty = loss_of(everyone_E), loss_of(~everyone_E)
    tolerance = truncation * abs(empty - full)
    phi_E = torch.zeros(num_experts, dtype=torch.float64)
    order = torch.randperm(num_experts, generator=generator)
    for sample in range(samples):
        order = order.flip(0) if sample % 2 else torch.randperm(num_experts, generator=generator)
        keep_E, before = torch.zeros(num_experts, dtype=torch.bool), empty
        for position, e in enumerate(order.tolist()):
            if tolerance > 0 and abs(before - full) <= tolerance:
                break
            keep_E[e] = True
            after = full if position == num_experts - 1 else loss_of(keep_E)
            phi_E[e] += before - after
            before = after
    return (phi_E / samples).float()


def exact_shapley(loss_of: Callable[[torch.Tensor], float], num_experts: int) -> torch.Tensor:
    """Shapley values [E] of v(S) = −L(S) from all 2^E coalitions: the reference for small layers.

    φ_e = Σ_{S ∌ e} |S|!·(E − |S| − 1)!/E! · (L(S) − L(S ∪ {e})).
    """
    loss_S = [
        loss_of(torch.tensor([bool(mask >> e & 1) for e in range(num_experts)])) for mask in range(2**num_experts)
    ]
    phi_E = torch.zeros(num_experts, dtype=torch.float64)
    for mask in range(2**num_experts):
        size = bin(mask).count("1")
        if size == num_experts:
            continue
        weight = math.factorial(size) * math.factorial(num_experts - size - 1) / math.factorial(num_experts)
        for e in (e for e in range(num_experts) if not mask >> e & 1):
            phi_E[e] += weight * (loss_S[mask] - loss_S[mask | 1 << e])
    return phi_E.float()


# ---------------------------------------------------------------------------------------------- views by scorer


@dataclass
class LayerView:
    """One measurement of a layer's experts: contributions [E], who failed [E], and who was seen at
    all [E] (had tokens or failed); the EMA moves only for experts that were seen."""

    contribution_E: torch.Tensor
    failed_E: torch.Tensor
    observed_E: torch.Tensor
    curvature_E: torch.Tensor | None = None  # taylor: the second-order part of contribution_E, if measured


def evidence_views(
    cfg: PoIConfig, evidence: dict[str, LayerEvidence], curvature: Curvature | None = None
) -> dict[str, LayerView]:
    """Views of an evidence-based scorer (taylor, gate) from each layer's kept evidence."""
    views = {}
    for name, ev in evidence.items():
        if ev is None:
            continue
        failed_E = failed_in(ev)
        observed_E = failed_E | (ev.plan.counts.cpu() > 0)
        if cfg.name == "gate":
            views[name] = LayerView(gate_mass(ev), failed_E, observed_E)
            continue
        grad_ND = curvature.grad_ND.get(name) if curvature is not None else None
        scale, examples = (curvature.scale, curvature.examples) if curvature is not None else (1.0, 1)
        first_E, second_E = taylor_contributions(ev, cfg.counterfactual, grad_ND, scale, examples)
        contribution_E = first_E if second_E is None else first_E + second_E
        views[name] = LayerView(contribution_E, failed_E, observed_E, second_E)
    return views


EVIDENCE_SCORERS = ("taylor", "gate")


def masked_views(cfg: PoIConfig, model, batch, generator: torch.Generator) -> dict[str, LayerView]:
    """Views of a counterfactual scorer (loo, shapley) on `batch`, layer by layer."""
    layers = model.moe_layers()
    contributions = {}
    with evaluation_mode(model), maskable_pools(layers) as pools:
        batch_loss(model, batch)  # the unmasked pass: fills every pool's cache
        for layer in layers:
            loss_of = coalition_loss(model, batch, pools[layer.name])
            if cfg.name == "loo":
                contributions[layer.name] = leave_one_out(loss_of, layer.pool.num_experts)
            else:
                contributions[layer.name] = permutation_shapley(
                    loss_of, layer.pool.num_experts, cfg.samples, generator, cfg.truncation
                )
    views = {}
    for name, contribution_E in contributions.items():
        failed_E, had_tokens_E = pools[name].observed()
        views[name] = LayerView(contribution_E, failed_E, failed_E | had_tokens_E)
    return views


def views_on_batch(cfg: PoIConfig, model, batch, generator: torch.Generator) -> dict[str, LayerView]:
    """A fresh view by `cfg`'s scorer on `batch`, in evaluation mode, leaving no gradients behind."""
    if cfg.name in EVIDENCE_SCORERS:
        taylor = cfg.name == "taylor"
        wants_curvature = taylor and cfg.curvature
        evidence, curvature = evidence_pass(model, batch, with_grad=taylor, generator=generator if wants_curvature else None)
        return evidence_views(cfg, evidence, curvature)
    return masked_views(cfg, model, batch, generator)


def fidelity(model, batch, samples: int = 16, generator: torch.Generator | None = None) -> dict[str, float]:
    """Spearman ρ of taylor, loo and gate against a `samples`-permutation Shapley estimate, per layer,
    all on `batch`: `poi/fidelity/<layer>/<scorer>`."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    reference = masked_views(ShapleyConfig(samples=samples), model, batch, generator)
    rivals = {"taylor": TaylorConfig(), "loo": LooConfig(), "gate": GateConfig()}
    results = {}
    for scorer, cfg in rivals.items():
        for layer, view in views_on_batch(cfg, model, batch, generator).items():
            results[f"poi/fidelity/{layer}/{scorer}"] = spearman(view.contribution_E, reference[layer].contribution_E)
    return results


def average_ranks(x_E: torch.Tensor) -> torch.Tensor:
    """Ranks 1..E of the values in ascending order, ties sharing their average rank."""
    values = x_E.double().tolist()
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return torch.tensor(ranks, dtype=torch.float64)


def spearman(a_E: torch.Tensor, b_E: torch.Tensor) -> float:
    """Spearman rank correlation (ties averaged); NaN when either side is constant."""
    ra, rb = average_ranks(a_E), average_ranks(b_E)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator > 0 else float("nan")


def score_ranks(score_E: torch.Tensor) -> torch.Tensor:
    """Rank of each expert [E], 1 = highest score; ties go to the lower index."""
    order_E = torch.sort(-score_E.double(), stable=True).indices
    return torch.empty_like(order_E).scatter_(0, order_E, torch.arange(1, score_E.numel() + 1))


# ---------------------------------------------------------------------------------------------- feedback


def quality_bias(score_E: torch.Tensor, load_E: torch.Tensor, strength: float, clip: float) -> torch.Tensor:
    """Per-token quality (score / traffic share), centred and in units of its mean magnitude, times
    `strength`, clipped to ±clip.

    Per token, because routing decides per token: a rarely used honest expert has a small total
    score but is as good per token, and must not be starved for it (totals would make the rich
    richer). Scale-free, so one strength means the same early and late in training.
    """
    quality_E = score_E / load_E.clamp_min(0.1 / load_E.numel())
    scale = float(quality_E.abs().mean())
    if strength == 0 or scale == 0:
        return torch.zeros_like(score_E)
    return (strength * (quality_E - quality_E.mean()) / scale).clamp(-clip, clip)


def raise_load_price(price_E: torch.Tensor, load_ratio_E: torch.Tensor, rate: float, bound: float) -> torch.Tensor:
    """A price per expert on the constraint load/mean ≤ bound: it rises by `rate` each step the expert
    is over the bound and falls by `rate` each step it is under, never below zero, so quality feedback
    cannot pile tokens onto a few experts. Steps of fixed size (as in loss-free balancing, Wang et al.
    2024) catch up with a large quality bias in a few dozen steps whatever the size of the excess;
    the load then hovers at the bound, above it in about half the steps."""
    return (price_E + rate * torch.sign(load_ratio_E - bound)).clamp_min(0.0)


# ---------------------------------------------------------------------------------------------- the scorer


@dataclass
class LayerState:
    """A layer's running PoI state; every field is a tensor so it checkpoints as is."""

    score_E: torch.Tensor
    views_E: torch.Tensor  # how many views saw each expert (the EMA starts at the first)
    failures_E: torch.Tensor  # failed training steps, over the run
    failed_since_view_E: torch.Tensor
    consecutive_E: torch.Tensor  # failed steps in a row
    banned_until_E: torch.Tensor  # banned while step < this
    bans_E: torch.Tensor
    load_E: torch.Tensor  # EMA of the share of assignments (traffic share)
    load_price_E: torch.Tensor
    bias_E: torch.Tensor  # the selection bias last written
    curvature_E: torch.Tensor  # taylor's last second-order term, reused between its measurements

    @classmethod
    def fresh(cls, num_experts: int) -> LayerState:
        zeros, counts = torch.zeros(num_experts), torch.zeros(num_experts, dtype=torch.long)
        return cls(
            score_E=zeros.clone(),
            views_E=counts.clone(),
            failures_E=counts.clone(),
            failed_since_view_E=torch.zeros(num_experts, dtype=torch.bool),
            consecutive_E=counts.clone(),
            banned_until_E=counts.clone(),
            bans_E=counts.clone(),
            load_E=torch.full((num_experts,), 1.0 / num_experts),
            load_price_E=zeros.clone(),
            bias_E=zeros.clone(),
            curvature_E=zeros.clone(),
        )


class PoIScorer:
    """Per-expert PoI for every MoE layer of `model`. Each training step: `before_backward(step, pred)`
    (taylor's curvature backward; optional), the training backward, then `observe(step)`.

    For the ledger: `scores()` (EMA per layer), `view(batch)` (a fresh view on an evaluation batch,
    as another validator would compute it), `failures` (failed steps per expert), `ranks()`.
    """

    def __init__(self, cfg: PoIConfig, model, eval_batches: list | None = None):
        check_config(cfg)
        self.cfg, self.model = cfg, model
        self.eval_batches = list(eval_batches or [])
        if cfg.name not in EVIDENCE_SCORERS and not self.eval_batches:
            raise ConfigError(f"poi={cfg.name} scores on evaluation batches, but the data gives none")
        self.layers = model.moe_layers()
        self.state = {layer.name: LayerState.fresh(layer.pool.num_experts) for layer in self.layers}
        self.last_ms, self._curvature_ms = 0.0, 0.0
        self.pending_fidelity: dict[str, float] = {}
        self.curvature: Curvature | None = None
        self._outputs: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            layer.keep_evidence = True  # every scorer needs each step's failures and loads
            if self._uses_curvature:
                layer.register_forward_hook(output_keeper(self._outputs))
        hidden = [layer.name for layer in self.layers if layer not in repeatable_layers(self.layers)]
        if hidden and cfg.name == "taylor":
            log.warning(
                "poi=taylor: layer(s) %s sit below a pool without repeatable_backward: their training scores "
                "are first order only (no curvature term) and fresh views (other validators) score them 0",
                hidden,
            )

    @property
    def _uses_curvature(self) -> bool:
        return self.cfg.name == "taylor" and self.cfg.curvature

    # --- each step

    def before_backward(self, step: int, pred: torch.Tensor) -> None:
        """Taylor's curvature: one extra backward of the loss against sampled targets, to the layer
        outputs only, when due (every `curvature_every` scoring steps)."""
        self.curvature = None
        if not self._uses_curvature or step % self.cfg.every or (step // self.cfg.every) % self.cfg.curvature_every:
            return
        tick = time.perf_counter()
        self.curvature = curvature_at_outputs(self.model, pred, self._outputs, self._generator(step))
        self._curvature_ms = 1e3 * (time.perf_counter() - tick)

    def observe(self, step: int) -> None:
        """Fold training step `step` (backward done) into the scores, then write the routing bias."""
        tick = time.perf_counter()
        evidence = {layer.name: layer.evidence for layer in self.layers}
        for name, ev in evidence.items():
            if ev is not None:
                self._record_answers(self.state[name], ev, step)
        if step % self.cfg.every == 0:
            self._fold(self._views(step, evidence))
        if self.cfg.fidelity_every and step % self.cfg.fidelity_every == 0:
            self.pending_fidelity = fidelity(
                self.model, self._eval_batch(step), self.cfg.fidelity_samples, self._generator(step)
            )
        self.apply_feedback(step)
        self._release()
        self.last_ms = self._curvature_ms + 1e3 * (time.perf_counter() - tick)
        self.curvature, self._curvature_ms = None, 0.0

    def _release(self) -> None:
        """Drop the captured layer outputs. Each layer's evidence stays until its next forward: the
        ledger reads this step's failures from it after the step."""
        self._outputs.clear()

    def _views(self, step: int, evidence: dict[str, LayerEvidence]) -> dict[str, LayerView]:
        if self.cfg.name not in EVIDENCE_SCORERS:
            return masked_views(self.cfg, self.model, self._eval_batch(step), self._generator(step))
        views = evidence_views(self.cfg, evidence, self.curvature)
        if self._uses_curvature:
            self._reuse_curvature(views)
        return views

    def _reuse_curvature(self, views: dict[str, LayerView]) -> None:
        """Between curvature measurements, add each expert's last measured second-order term."""
        for name, view in views.items():
            state = self.state[name]
            if view.curvature_E is not None:
                state.curvature_E = torch.where(view.observed_E, view.curvature_E, state.curvature_E)
            else:
                view.contribution_E = view.contribution_E + torch.where(view.observed_E, state.curvature_E, 0.0)

    def _eval_batch(self, step: int):
        if not self.eval_batches:
            raise ConfigError("poi needs evaluation batches for loo, shapley and fidelity; the data gives none")
        return self.eval_batches[(step // self.cfg.every) % len(self.eval_batches)]

    @staticmethod
    def _generator(step: int) -> torch.Generator:
        return torch.Generator().manual_seed(step)

    def _record_answers(self, state: LayerState, evidence: LayerEvidence, step: int) -> None:
        """Failures, bans and load from one training step."""
        failed_E = failed_in(evidence)
        counts_E = evidence.plan.counts.detach().cpu()
        state.failures_E += failed_E
        state.failed_since_view_E |= failed_E
        state.consecutive_E = torch.where(
            failed_E, state.consecutive_E + 1, torch.where(counts_E > 0, 0, state.consecutive_E)
        )
        if self.cfg.ban_after > 0:
            self._ban_repeat_offenders(state, step)
        share_E = counts_E.float() / counts_E.sum().clamp_min(1).float()
        decay = self.cfg.ema_decay
        state.load_E = decay * state.load_E + (1 - decay) * share_E
        if self.cfg.feedback > 0 and self.cfg.load_weight > 0:
            state.load_price_E = raise_load_price(
                state.load_price_E, share_E * share_E.numel(), self.cfg.load_weight, self.cfg.load_bound
            )

    def _ban_repeat_offenders(self, state: LayerState, step: int) -> None:
        offenders_E = state.consecutive_E >= self.cfg.ban_after
        if not bool(offenders_E.any()):
            return
        length_E = (self.cfg.ban_steps * 2 ** state.bans_E.clamp_max(30)).clamp_max(self.cfg.ban_max_steps)
        state.banned_until_E = torch.where(offenders_E, step + 1 + length_E, state.banned_until_E)
        state.bans_E += offenders_E
        state.consecutive_E[offenders_E] = 0
        log.info(
            "poi: banning expert(s) %s until steps %s",
            offenders_E.nonzero().flatten().tolist(),
            state.banned_until_E[offenders_E].tolist(),
        )

    def _fold(self, views: dict[str, LayerView]) -> None:
        """EMA each seen expert's score towards this view (its first view sets it)."""
        for name, view in views.items():
            state = self.state[name]
            failed_E = view.failed_E | state.failed_since_view_E
            seen_E = view.observed_E | state.failed_since_view_E
            value_E = self.penalised(view.contribution_E, failed_E, state.score_E)
            decay_E = torch.where(state.views_E > 0, self.cfg.ema_decay, 0.0)
            updated_E = decay_E * state.score_E + (1 - decay_E) * value_E
            state.score_E = torch.where(seen_E, updated_E, state.score_E)
            state.views_E += seen_E
            state.failed_since_view_E = torch.zeros_like(failed_E)

    def penalised(self, contribution_E: torch.Tensor, failed_E: torch.Tensor, score_E: torch.Tensor) -> torch.Tensor:
        """Failed experts earn nothing and score −penalty × the mean |contribution| of those that answered."""
        answered = contribution_E[~failed_E]
        scale = answered.abs().mean() if answered.numel() else score_E.abs().mean()
        return torch.where(failed_E, -self.cfg.failure_penalty * scale, contribution_E)

    def apply_feedback(self, step: int) -> None:
        """Write each layer's selection-only bias for the next step: quality − load price, bans masked."""
        for layer in self.layers:
            state = self.state[layer.name]
            bias_E = torch.zeros_like(state.score_E)
            if self.cfg.feedback > 0:
                bias_E = quality_bias(state.score_E, state.load_E, self.cfg.feedback, self.cfg.feedback_clip)
                bias_E = bias_E - state.load_price_E
            bias_E = torch.where(self.banned(layer.name, step + 1), BAN_BIAS, bias_E)
            state.bias_E = bias_E
            layer.selection_bias_E.copy_(bias_E)

    # --- what others read

    def banned(self, layer: str, step: int) -> torch.Tensor:
        """Experts banned at `step` [E]."""
        return self.state[layer].banned_until_E > step

    def scores(self) -> dict[str, torch.Tensor]:
        """The current EMA score per layer [E] (the validator's own view, e.g. for ledger weights)."""
        return {name: state.score_E.clone() for name, state in self.state.items()}

    def ranks(self) -> dict[str, torch.Tensor]:
        return {name: score_ranks(state.score_E) for name, state in self.state.items()}

    @property
    def failures(self) -> dict[str, torch.Tensor]:
        """Failed training steps per expert per layer [E] (long), over the run."""
        return {name: state.failures_E.clone() for name, state in self.state.items()}

    def view(self, batch, step: int = 0) -> dict[str, torch.Tensor]:
        """A fresh contribution view [E] per layer on `batch` by this scorer's method, as another
        validator holding the same model would compute it; experts failing in it get the penalty.
        Touches neither the scores nor any gradient."""
        views = views_on_batch(self.cfg, self.model, batch, self._generator(step))
        self._release()
        return {
            name: self.penalised(view.contribution_E, view.failed_E, self.state[name].score_E)
            for name, view in views.items()
        }

    def metrics(self) -> dict[str, float]:
        """`poi/score|rank|load|bias/<layer>/<expert>`, failures and bans, fidelity measured since the
        last call, and the scorer's time this step (`perf/poi_ms`)."""
        metrics: dict[str, float] = {"perf/poi_ms": self.last_ms, **self.expert_table()}
        for name, state in self.state.items():
            for e, bias in enumerate(state.bias_E.tolist()):
                metrics[f"poi/bias/{name}/{e}"] = bias
                if state.failures_E[e] > 0:
                    metrics[f"poi/failures/{name}/{e}"] = int(state.failures_E[e])
            metrics[f"poi/banned/{name}"] = int((state.bias_E <= BAN_BIAS).sum())
        metrics.update(self.pending_fidelity)
        self.pending_fidelity = {}
        return metrics

    def summary(self) -> dict:
        """Final per-expert score, rank and traffic share per layer, for summary.json."""
        return {"poi/scorer": self.cfg.name, **self.expert_table()}

    def expert_table(self) -> dict[str, float]:
        """`poi/score|rank|load/<layer>/<expert>` for every layer and expert."""
        table: dict[str, float] = {}
        for name, state in self.state.items():
            ranks = score_ranks(state.score_E).tolist()
            for e, score in enumerate(state.score_E.tolist()):
                table[f"poi/score/{name}/{e}"] = score
                table[f"poi/rank/{name}/{e}"] = ranks[e]
                table[f"poi/load/{name}/{e}"] = float(state.load_E[e])
        return table

    def state_dict(self) -> dict:
        return {name: dataclasses.asdict(state) for name, state in self.state.items()}

    def load_state_dict(self, saved: dict) -> None:
        for name, fields in saved.items():
            if name in self.state:
                self.state[name] = LayerState(**{**dataclasses.asdict(self.state[name]), **fields})


# ---------------------------------------------------------------------------------------------- registry

_CONFIGS: dict[str, type[PoIConfig]] = {
    "taylor": TaylorConfig,
    "loo": LooConfig,
    "shapley": ShapleyConfig,
    "gate": GateConfig,
}


def poi_configs() -> dict[str, type[PoIConfig]]:
    """Config dataclass per scorer name, for Hydra's ConfigStore."""
    return dict(_CONFIGS)


def make_config(cfg) -> PoIConfig:
    """A typed config from a Hydra node, a mapping or a config dataclass; unknown names list the valid ones."""
    if isinstance(cfg, PoIConfig):
        return cfg
    options = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    name = options.get("name")
    if name not in _CONFIGS:
        raise ConfigError(f"unknown poi scorer '{name}'; valid scorers: {', '.join(sorted(_CONFIGS))}")
    try:
        typed = OmegaConf.merge(OmegaConf.structured(_CONFIGS[name]), options)
    except Exception as err:  # OmegaConf's validation errors carry the key
        raise ConfigError(f"bad option poi.{getattr(err, 'key', '?')} for '{name}': {str(err).splitlines()[0]}") from None
    return OmegaConf.to_object(typed)


def build_scorer(cfg, model, eval_batches: list | None = None) -> PoIScorer | None:
    """The run's scorer (None when `poi` is null); it marks the model's MoE layers to keep evidence."""
    return None if cfg is None else PoIScorer(make_config(cfg), model, eval_batches)


def format_summary(summary: dict) -> list[str]:
    """Compact lines for the CLI: per layer, each expert's score and (rank)."""
    layers: dict[str, list[str]] = {}
    for key, score in summary.items():
        if key.startswith("poi/score/"):
            layer, expert = key.removeprefix("poi/score/").rsplit("/", 1)
            rank = summary.get(f"poi/rank/{layer}/{expert}")
            layers.setdefault(layer, []).append(f"e{expert} {score:+.3g} (#{rank})")
    if not layers:
        return []
    lines = [f"PoI ({summary.get('poi/scorer', '?')}; score = loss increase without the expert, #1 = most helpful):"]
    for layer, cells in layers.items():
        for start in range(0, len(cells), 4):
            label = layer if start == 0 else ""
            lines.append(f"  {label:8s} " + "   ".join(cells[start : start + 4]))
    return lines
