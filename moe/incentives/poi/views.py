"""Views: one measurement of every expert's contribution per layer, by a scorer's method.

`taylor` and `gate` read layer evidence (a training step's, or an evaluation pass's); `loo` and
`shapley` run counterfactual passes on an evaluation batch with experts masked through each layer's
side pass, so "without e" takes exactly the path of a real failure. All evaluation passes leave the
training step's trace (each layer's `last_plan` and `evidence`) alone.

Legend: N tokens, D model width, E experts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from moe.incentives.poi.config import EVIDENCE_SCORERS, PoIConfig
from moe.incentives.poi.evidence import (
    Curvature,
    captured_outputs,
    curvature_at_outputs,
    failed_in,
    gradients_at_outputs,
    mean_gate_mass,
    taylor_contributions,
)
from moe.nn.layer import LayerEvidence, SidePass


@dataclass
class LayerView:
    """One measurement of a layer's experts: contributions [E], who failed [E], and who was seen at
    all [E] (had tokens or failed); the EMA moves only for experts that were seen."""

    contribution_E: torch.Tensor
    failed_E: torch.Tensor
    observed_E: torch.Tensor
    curvature_E: torch.Tensor | None = None  # taylor: the second-order part of contribution_E, if measured


@contextmanager
def evaluation_mode(model) -> Iterator[dict[str, SidePass]]:
    """Evaluation-mode passes, each layer in a side pass (yielded by layer name); the training mode is
    put back afterwards."""
    was_training = model.training
    model.eval()
    try:
        with ExitStack() as stack:
            yield {layer.name: stack.enter_context(layer.side_pass()) for layer in model.moe_layers()}
    finally:
        model.train(was_training)


def on_model_device(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    return batch.inputs.to(device), batch.targets.to(device)


@torch.no_grad()
def batch_loss(model, batch) -> float:
    inputs, targets = on_model_device(model, batch)
    pred, _ = model(inputs)
    return float(model.loss_per_example(pred, targets).mean())


def evidence_pass(
    model, batch, *, with_grad: bool, generator: torch.Generator | None = None
) -> tuple[dict[str, LayerEvidence], Curvature | None]:
    """One evaluation-mode forward on `batch` giving each layer's evidence; with `with_grad` also the
    loss gradient at each layer output and, given a `generator`, the curvature gradients. Gradients
    stop at the layer outputs, so no parameter's `.grad` changes."""
    layers = model.moe_layers()
    curvature = None
    with evaluation_mode(model) as passes, torch.enable_grad(), captured_outputs(layers) as outputs:
        inputs, targets = on_model_device(model, batch)
        pred, _ = model(inputs)
        evidence = {name: side.evidence for name, side in passes.items()}
        if with_grad:
            if generator is not None:
                curvature = curvature_at_outputs(model, pred, outputs, generator)
            loss = model.loss_per_example(pred, targets).mean()
            for name, grad_ND in gradients_at_outputs(loss, model, outputs, keep_graph=False).items():
                evidence[name].grad_out_ND = grad_ND
    return evidence, curvature


def coalition_loss(model, batch, side: SidePass) -> Callable[[torch.Tensor], float]:
    """L(coalition) on `batch` with only the experts in `keep_E` answering in `side`'s layer; memoised."""
    memo: dict[tuple[bool, ...], float] = {}

    def loss_of(keep_E: torch.Tensor) -> float:
        key = tuple(keep_E.tolist())
        if key not in memo:
            with side.masking(keep_E):
                memo[key] = batch_loss(model, batch)
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


def _loo_contributions(loss_of, num_experts: int, cfg: PoIConfig, generator: torch.Generator) -> torch.Tensor:
    return leave_one_out(loss_of, num_experts)


def _shapley_contributions(loss_of, num_experts: int, cfg: PoIConfig, generator: torch.Generator) -> torch.Tensor:
    return permutation_shapley(loss_of, num_experts, cfg.samples, generator, cfg.truncation)


# Counterfactual scorers by name: each turns a coalition loss L(keep_E) into contributions [E].
COALITION_SCORERS = {"loo": _loo_contributions, "shapley": _shapley_contributions}


def evidence_views(
    cfg: PoIConfig, evidence: dict[str, LayerEvidence | None], curvature: Curvature | None = None
) -> dict[str, LayerView]:
    """Views of an evidence-based scorer (taylor, gate) from each layer's evidence."""
    views = {}
    for name, ev in evidence.items():
        if ev is None:
            continue
        failed_E = failed_in(ev)
        observed_E = failed_E | (ev.plan.counts.cpu() > 0)
        if cfg.name == "gate":
            views[name] = LayerView(mean_gate_mass(ev), failed_E, observed_E)
            continue
        grad_ND = curvature.grad_ND.get(name) if curvature is not None else None
        scale, examples = (curvature.scale, curvature.examples) if curvature is not None else (1.0, 1)
        first_E, second_E = taylor_contributions(ev, cfg.counterfactual, grad_ND, scale, examples)
        contribution_E = first_E if second_E is None else first_E + second_E
        views[name] = LayerView(contribution_E, failed_E, observed_E, second_E)
    return views


def masked_views(cfg: PoIConfig, model, batch, generator: torch.Generator) -> dict[str, LayerView]:
    """Views of a counterfactual scorer (loo, shapley) on `batch`, layer by layer."""
    contributions = {}
    with evaluation_mode(model) as passes:
        batch_loss(model, batch)  # the unmasked pass: every layer's first answer, reused below
        for layer in model.moe_layers():
            loss_of = coalition_loss(model, batch, passes[layer.name])
            contribute = COALITION_SCORERS[cfg.name]
            contributions[layer.name] = contribute(loss_of, layer.pool.num_experts, cfg, generator)
    views = {}
    for name, contribution_E in contributions.items():
        failed_E, had_tokens_E = passes[name].unmasked_answers()
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
