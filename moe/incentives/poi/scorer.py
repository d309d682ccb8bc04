"""The PoI scorer: per layer and expert an EMA of contributions, failure counts and bans, and the
routing feedback it writes into each layer's selection bias after every training step.

Legend: E experts.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from moe.errors import ConfigError
from moe.incentives.poi.config import EVIDENCE_SCORERS, PoIConfig, typed_poi_config
from moe.incentives.poi.evidence import (
    Curvature,
    curvature_at_outputs,
    failed_in,
    output_keeper,
    repeatable_layers,
)
from moe.incentives.poi.feedback import BAN_BIAS, ban_lengths, raise_load_price, selection_bias
from moe.incentives.poi.fidelity import fidelity, score_ranks
from moe.incentives.poi.views import LayerView, evidence_views, masked_views, views_on_batch
from moe.nn.layer import LayerEvidence
from router.seeds import torch_generator

__all__ = ["LayerState", "PoIScorer", "build_scorer", "format_summary"]

log = logging.getLogger(__name__)


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
    Random draws (sampled targets, Shapley permutations) come from the stream ("poi", step) of `seed`.
    """

    def __init__(self, cfg: PoIConfig | Mapping, model, eval_batches: list | None = None, seed: int = 0):
        self.cfg, self.model, self.seed = typed_poi_config(cfg), model, seed
        self.eval_batches = list(eval_batches or [])
        if self.cfg.name not in EVIDENCE_SCORERS and not self.eval_batches:
            raise ConfigError(f"poi={self.cfg.name} scores on evaluation batches, but the data gives none")
        self.layers = model.moe_layers()
        self.state = {layer.name: LayerState.fresh(layer.pool.num_experts) for layer in self.layers}
        self.last_ms, self._curvature_ms = 0.0, 0.0
        self.pending_fidelity: dict[str, float] = {}
        self.curvature: Curvature | None = None
        self._outputs: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            layer.record_evidence()  # every scorer needs each step's failures and loads
            if self._uses_curvature:
                layer.register_forward_hook(output_keeper(self._outputs))
        hidden = [layer.name for layer in self.layers if layer not in repeatable_layers(self.layers)]
        if hidden and self.cfg.name == "taylor":
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
        if (
            not self._uses_curvature
            or step % self.cfg.every
            or (step // self.cfg.every) % self.cfg.curvature_every
        ):
            return
        tick = time.perf_counter()
        self.curvature = curvature_at_outputs(self.model, pred, self._outputs, self.generator(step))
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
                self.model, self._eval_batch(step), self.cfg.fidelity_samples, self.generator(step)
            )
        self.apply_feedback(step)
        self._outputs.clear()  # the layer outputs of this step; each layer's evidence stays for the ledger
        self.last_ms = self._curvature_ms + 1e3 * (time.perf_counter() - tick)
        self.curvature, self._curvature_ms = None, 0.0

    def _views(self, step: int, evidence: dict[str, LayerEvidence | None]) -> dict[str, LayerView]:
        if self.cfg.name not in EVIDENCE_SCORERS:
            return masked_views(self.cfg, self.model, self._eval_batch(step), self.generator(step))
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
                view.contribution_E = view.contribution_E + torch.where(
                    view.observed_E, state.curvature_E, 0.0
                )

    def _eval_batch(self, step: int):
        if not self.eval_batches:
            raise ConfigError(
                "poi needs evaluation batches for loo, shapley and fidelity; the data gives none"
            )
        return self.eval_batches[(step // self.cfg.every) % len(self.eval_batches)]

    def generator(self, step: int) -> torch.Generator:
        """A fresh generator for step `step`'s draws: the stream ("poi", step) of the run's seed."""
        return torch_generator(self.seed, "poi", step)

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
        length_E = ban_lengths(state.bans_E, self.cfg.ban_steps, self.cfg.ban_max_steps)
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

    def penalised(
        self, contribution_E: torch.Tensor, failed_E: torch.Tensor, score_E: torch.Tensor
    ) -> torch.Tensor:
        """Failed experts earn nothing and score −penalty × the mean |contribution| of those that answered."""
        answered = contribution_E[~failed_E]
        scale = answered.abs().mean() if answered.numel() else score_E.abs().mean()
        return torch.where(failed_E, -self.cfg.failure_penalty * scale, contribution_E)

    def apply_feedback(self, step: int) -> None:
        """Write each layer's selection-only bias for the next step: quality − load price, bans masked."""
        for layer in self.layers:
            state = self.state[layer.name]
            state.bias_E = selection_bias(
                state.score_E,
                state.load_E,
                state.load_price_E,
                self.banned(layer.name, step + 1),
                self.cfg.feedback,
                self.cfg.feedback_clip,
            )
            layer.set_selection_bias(state.bias_E)

    # --- what others read

    def banned(self, layer: str, step: int) -> torch.Tensor:
        """Experts banned at `step` [E]."""
        return self.state[layer].banned_until_E > step

    def has_views(self) -> bool:
        """Whether any view has scored any expert yet (from the state, so a resumed run agrees)."""
        return any(bool(state.views_E.any()) for state in self.state.values())

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
        Touches neither the scores, nor any gradient, nor the layers' trace of the training step."""
        views = views_on_batch(self.cfg, self.model, batch, self.generator(step))
        self._outputs.clear()  # the evaluation pass's outputs, caught by the training-output hooks
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


def build_scorer(cfg, model, eval_batches: list | None = None, seed: int = 0) -> PoIScorer | None:
    """The run's scorer (None when `poi` is null); it makes the model's MoE layers record evidence.
    `seed` is the run's seed (its "poi" streams)."""
    return None if cfg is None else PoIScorer(cfg, model, eval_batches, seed=seed)


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
    lines = [
        f"PoI ({summary.get('poi/scorer', '?')}; score = loss increase without the expert, #1 = most helpful):"
    ]
    for layer, cells in layers.items():
        for start in range(0, len(cells), 4):
            label = layer if start == 0 else ""
            lines.append(f"  {label:8s} " + "   ".join(cells[start : start + 4]))
    return lines
