"""What a training step leaves for PoI, turned into per-expert numbers: each assignment's weight, the
Taylor estimate of L(without e) − L(all) from the layer evidence, its second-order (curvature) term from
one extra backward against targets sampled from the model, and the gate mass baseline.

Legend: N tokens, D model width, E experts, A assignments sorted by expert, B examples, T time,
Y vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from moe.nn.layer import LayerEvidence, MoELayer, renormalize_over_answered


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
    first_E.index_add_(
        0, expert_A.cpu(), removal_dots(evidence, evidence.grad_out_ND, counterfactual).float().cpu()
    )
    if curvature_grad_ND is None:
        return first_E, None
    q_A = removal_dots(evidence, curvature_grad_ND, counterfactual)
    example_A = plan.token_idx // max(plan.num_tokens // examples, 1)
    q_BE = q_A.new_zeros(examples * plan.num_experts).index_add_(
        0, example_A * plan.num_experts + expert_A, q_A
    )
    second_E = 0.5 * scale * examples * q_BE.view(examples, plan.num_experts).square().sum(0)
    return first_E, second_E.float().cpu()


def mean_gate_mass(evidence: LayerEvidence) -> torch.Tensor:
    """Mean gate mass per token each expert carried [E] (after renormalising over the answered): the
    `gate` scorer's view. Not the ledger's fallback `rewards.gate_mass_by_layer` (a raw sum per expert)."""
    plan = evidence.plan
    weight_A = assignment_weights(evidence).cpu()
    return torch.zeros(plan.num_experts).index_add_(0, plan.expert_idx.cpu(), weight_A) / max(
        plan.num_tokens, 1
    )


def failed_in(evidence: LayerEvidence) -> torch.Tensor:
    """Experts that did not answer in this evidence [E] (bool, CPU)."""
    return ~evidence.answered_E.detach().cpu()


def sampled_targets(task: str, pred: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """Targets drawn from the model's own predictive distribution, and the Fisher `scale`.

    Must match `MoEModel.loss_per_example`: for the byte LM (mean cross-entropy over T positions) a
    byte per position from softmax(logits), scale T; for regression (mean squared error over O
    outputs, i.e. a Gaussian of variance O/2) pred + N(0, O/2), scale 1.
    """
    pred = pred.detach().float()
    if task == "lm":
        probs_NY = pred.reshape(-1, pred.shape[-1]).softmax(-1)
        targets = torch.multinomial(probs_NY.cpu(), 1, generator=generator).view(pred.shape[:-1])
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
        if all(later.pool.repeatable_backward for later in layers[i + 1 :])
    ]


@contextmanager
def input_gradients_only(layers: list[MoELayer]) -> Iterator[None]:
    """Backward passes inside only ask the pools for input gradients (see `ExpertPool`)."""
    with ExitStack() as stack:
        for layer in layers:
            stack.enter_context(layer.pool.only_input_gradients())
        yield


def gradients_at_outputs(
    loss: torch.Tensor, model, outputs: dict[str, torch.Tensor], *, keep_graph: bool
) -> dict[str, torch.Tensor]:
    """d loss / d(layer output) [N, D] per layer whose gradient may be taken (`repeatable_layers`), by a
    backward that changes no parameter's `.grad`."""
    wanted = [layer for layer in repeatable_layers(model.moe_layers()) if layer.name in outputs]
    wanted = [layer for layer in wanted if outputs[layer.name].requires_grad]
    if not wanted:
        return {}
    with input_gradients_only(model.moe_layers()):
        grads = torch.autograd.grad(
            loss, [outputs[layer.name] for layer in wanted], retain_graph=keep_graph, allow_unused=True
        )
    return {
        layer.name: grad.detach().reshape(-1, grad.shape[-1]).float()
        for layer, grad in zip(wanted, grads, strict=True)
        if grad is not None
    }


def curvature_at_outputs(
    model, pred: torch.Tensor, outputs: dict[str, torch.Tensor], generator: torch.Generator
) -> Curvature | None:
    """One backward, to the MoE layer outputs only, of the loss against sampled targets; the graph is
    kept for the training backward that follows."""
    if not any(output.requires_grad for output in outputs.values()):
        return None
    targets, scale = sampled_targets(model.task, pred, generator)
    loss = model.loss_per_example(pred, targets).mean()
    grad_ND = gradients_at_outputs(loss, model, outputs, keep_graph=True)
    return Curvature(grad_ND, scale, examples=pred.shape[0]) if grad_ND else None


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
