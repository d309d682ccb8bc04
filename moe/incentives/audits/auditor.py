"""The validators' auditor: samples calls after their replies and audits them once their owners have
stepped (at the end of the same training step), keeping per-expert tallies for metrics and the
failures (with evidence) for the ledger.

Legend: A assignments of a layer's call, a one expert's rows, K sketch directions, E experts.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass

import torch

from experts.commitments import row_sketch_AK
from moe.incentives.audits.checks import EarlierCall, Replicas, SampledCall, Verdict, audit_call
from moe.incentives.audits.config import AuditConfig, tolerances
from router.seeds import torch_generator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FailedAudit:
    """One failed audit, as the ledger records it."""

    layer: str
    expert: int
    step: int
    check: str
    evidence: dict


class Auditor:
    """Audits a random `cfg.rate` of each layer's training calls (see `checks.audit_call`)."""

    def __init__(self, cfg: AuditConfig, layers, seed: int):
        self.cfg, self.layers, self.seed = cfg, list(layers), seed
        for layer in self.layers:
            layer.pool.enable_audits(cfg.window)
        # per layer: its last `window` calls (replay evidence)
        self.history = {layer.name: deque(maxlen=cfg.window) for layer in self.layers}
        self.tally: Counter = Counter()  # (layer, expert, "run" | "failed")
        self.seconds = 0.0
        self.replicas = Replicas()

    def state_dict(self) -> dict:
        """The tallies and the recent calls' sketches (copy and replay evidence), for checkpoints."""
        return {
            "tally": [[layer, expert, what, n] for (layer, expert, what), n in self.tally.items()],
            "history": {name: [call.saved() for call in calls] for name, calls in self.history.items()},
            "seconds": self.seconds,
        }

    def load_state_dict(self, saved: dict) -> None:
        self.tally = Counter({(layer, int(expert), what): n for layer, expert, what, n in saved["tally"]})
        for name, calls in saved["history"].items():
            if name in self.history:
                self.history[name].clear()
                self.history[name].extend(EarlierCall(*call, sketched=True) for call in calls)
        self.seconds = float(saved.get("seconds", 0.0))

    def after_step(self, step: int) -> list[FailedAudit]:
        """Sample this step's calls and audit them (owners have stepped); returns the failures."""
        start = time.perf_counter()
        failures = []
        for layer in self.layers:
            for call in self.sample(layer, step):
                tolerance = tolerances(call.dtype, self.cfg.tolerance)
                verdict = audit_call(layer.pool, call, tolerance, self.cfg.timeout, self.replicas)
                failures += self.count(call, verdict)
        self.seconds += time.perf_counter() - start
        return failures

    def sample(self, layer, step: int) -> list[SampledCall]:
        """The calls of `layer`'s latest training call (at `step`) drawn for audit; the draw comes from
        the validators' own stream, after the replies."""
        record, layer.pool.last_call = layer.pool.last_call, None  # drop the references to the inputs
        if record is None or record.step != step:
            return []
        draws_E = torch.rand(
            len(record.sizes), generator=torch_generator(self.seed, "audit", layer.name, step)
        )
        offsets = [0]
        for size in record.sizes:
            offsets.append(offsets[-1] + size)
        history = self.history[layer.name]
        sampled = []
        for e, draw in enumerate(draws_E.tolist()):
            if record.versions[e] < 0 or not record.sizes[e] or draw >= self.cfg.rate:
                continue
            rows = slice(offsets[e], offsets[e + 1])
            grad = None if record.grad_y_AD is None else record.grad_y_AD[rows]  # views: none is written
            sampled.append(SampledCall(layer.name, e, step, record.versions[e], list(record.versions),
                                       record.x_AD[rows], row_sketch_AK(record.y_AD[rows]), grad,
                                       record.autocast_dtype, list(history)))  # fmt: skip
        history.append(EarlierCall(step, record.sizes, record.y_AD, record.x_AD))
        return sampled

    def count(self, call: SampledCall, verdict: Verdict) -> list[FailedAudit]:
        self.tally[(call.layer, call.expert, "run")] += 1
        if verdict.passed:
            return []
        self.tally[(call.layer, call.expert, "failed")] += 1
        log.info("audit failed: %s/%d at step %d (%s): %s", call.layer, call.expert, call.step, verdict.check,
                 verdict.evidence)  # fmt: skip
        return [FailedAudit(call.layer, call.expert, call.step, verdict.check, verdict.evidence)]

    def metrics(self) -> dict[str, float]:
        """`audits/<layer>/<expert>/{run,failed}` so far, and the seconds audits have taken."""
        metrics = {
            f"audits/{layer}/{expert}/{what}": float(n) for (layer, expert, what), n in self.tally.items()
        }
        return {**metrics, "audits/seconds": self.seconds}


def build_auditor(cfg: AuditConfig, layers, seed: int) -> Auditor | None:
    """The run's auditor, or None when audits are off (`audit.rate: 0`)."""
    return Auditor(cfg, layers, seed) if cfg.rate > 0 else None
