"""Views: one measurement of every expert's contribution per layer, by a scorer's method.

`taylor` and `gate` read layer evidence (a training step's, or an evaluation pass's); `loo`,
`shapley`, `exact_shapley` and `token_shapley` run counterfactual passes on an evaluation batch with experts masked through each layer's
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
from moe.incentives.poi.shapley import exact_shapley, permutation_shapley, token_shapley
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


@torch.no_grad()
def token_losses(model, batch) -> torch.Tensor:
    """The loss of every token of `batch` [N], in the MoE layers' token order."""
    inputs, targets = on_model_device(model, batch)
    pred, _ = model(inputs)
    return model.loss_per_token(pred, targets)


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


def coalition_loss(
    model, batch, side: SidePass, unmasked_N: torch.Tensor | None = None
) -> Callable[[torch.Tensor], float]:
    """L(coalition) on `batch` with only the experts in `keep_E` answering in `side`'s layer; memoised,
    starting from the unmasked pass's token losses where given."""
    memo: dict[tuple[bool, ...], float] = {}
    if unmasked_N is not None:
        memo[(True,) * side.num_experts] = float(unmasked_N.mean())

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


def _loo_contributions(
    model, batch, side: SidePass, unmasked_N: torch.Tensor, cfg: PoIConfig, generator: torch.Generator
) -> torch.Tensor:
    return leave_one_out(coalition_loss(model, batch, side, unmasked_N), side.num_experts)


def _shapley_contributions(
    model, batch, side: SidePass, unmasked_N: torch.Tensor, cfg: PoIConfig, generator: torch.Generator
) -> torch.Tensor:
    return permutation_shapley(
        coalition_loss(model, batch, side, unmasked_N),
        side.num_experts,
        cfg.samples,
        generator,
        cfg.truncation,
    )


def _exact_shapley_contributions(
    model, batch, side: SidePass, unmasked_N: torch.Tensor, cfg: PoIConfig, generator: torch.Generator
) -> torch.Tensor:
    return exact_shapley(coalition_loss(model, batch, side, unmasked_N), side.num_experts)


def _token_shapley_contributions(
    model, batch, side: SidePass, unmasked_N: torch.Tensor, cfg: PoIConfig, generator: torch.Generator
) -> torch.Tensor:
    plan = side.first_plan()

    def token_losses_of(keep_A: torch.Tensor) -> torch.Tensor:
        if bool(keep_A.all()):
            return unmasked_N
        with side.masking(keep_A=keep_A):
            return token_losses(model, batch)

    return token_shapley(
        token_losses_of,
        plan.token_idx,
        plan.expert_idx,
        plan.num_tokens,
        plan.num_experts,
        cfg.permutations,
        generator,
    )


# Counterfactual scorers by name: each masks experts (or assignments) of one layer in its side pass and
# turns the losses into contributions [E].
COALITION_SCORERS = {
    "loo": _loo_contributions,
    "shapley": _shapley_contributions,
    "exact_shapley": _exact_shapley_contributions,
    "token_shapley": _token_shapley_contributions,
}


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
    """Views of a counterfactual scorer (`COALITION_SCORERS`) on `batch`, layer by layer."""
    contributions = {}
    with evaluation_mode(model) as passes:
        unmasked_N = token_losses(model, batch)  # every layer's first answer, reused below
        contribute = COALITION_SCORERS[cfg.name]
        for layer in model.moe_layers():
            contributions[layer.name] = contribute(
                model, batch, passes[layer.name], unmasked_N, cfg, generator
            )
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
        evidence, curvature = evidence_pass(
            model, batch, with_grad=taylor, generator=generator if wants_curvature else None
        )
        return evidence_views(cfg, evidence, curvature)
    return masked_views(cfg, model, batch, generator)
