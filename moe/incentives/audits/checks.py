"""The checks of one audit, as a validator runs them on a sampled call (`SampledCall`).

1. Ask the owner for its state at the version it answered with (`pool.audit`); refusal or timeout fails.
2. The parameters must match the commitment the owner published for that version (as must the next
   commitment the answer names); a version it announced without a commitment fails.
3. Re-run the expert on the call's inputs (same autocast) and compare the row sketches of its output
   with those of the output received, within the dtype's tolerance.
4. Replay the owner's optimizer step on the gradient the call's outputs received: the parameters of
   the version it committed to next must follow (a miner that stopped learning has no next version).
When the output differs, the evidence says what it matches instead: another expert's output on the
same inputs (a copy), or an earlier call's output (a replay).

Legend: a rows of the sampled call, D model width, K sketch directions, h rows of earlier calls.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from experts.commitments import (
    AuditAnswer,
    AuditRefused,
    digest,
    load_optimizer_snapshot,
    param_sketch_P,
    relative_gap,
    row_sketch_AK,
)
from experts.owner import ExpertOwner
from experts.pool import ExpertPool

SAME_ROW = 1e-5  # relative sketch distance under which two rows count as the same answer
SAME_SKETCH = 1e-4  # parameters match a published commitment (float32 sketches, any thread count)


@dataclass(frozen=True)
class EarlierCall:
    """One of a layer's recent calls, kept as replay evidence: its outputs as received and inputs,
    [A, D] references (sketched only when a failed answer needs explaining), or their [A, K] row
    sketches (`sketched`: as saved in a checkpoint)."""

    step: int
    sizes: list[int]
    out: torch.Tensor
    inputs: torch.Tensor
    sketched: bool = False

    def sketches(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row sketches of expert `expert`'s outputs and inputs in this call."""
        start = sum(self.sizes[:expert])
        rows = slice(start, start + self.sizes[expert])
        if self.sketched:
            return self.out[rows], self.inputs[rows]
        return row_sketch_AK(self.out[rows]), row_sketch_AK(self.inputs[rows])

    def saved(self) -> list:
        """[step, sizes, output sketches, input sketches]: what a checkpoint keeps."""
        if self.sketched:
            return [self.step, self.sizes, self.out, self.inputs]
        return [self.step, self.sizes, row_sketch_AK(self.out), row_sketch_AK(self.inputs)]


@dataclass
class SampledCall:
    """What a validator copied of one sampled call: enough to audit it after the owner has stepped."""

    layer: str
    expert: int
    step: int
    version: int
    versions: list[int]  # every expert's version in that call (a copied peer is re-run at its own)
    x_aD: torch.Tensor
    sketch_aK: torch.Tensor
    grad_y_aD: torch.Tensor | None
    autocast_dtype: torch.dtype | None
    earlier: list[EarlierCall] = field(default_factory=list)  # the layer's calls of the last steps

    @property
    def dtype(self) -> torch.dtype:
        return self.autocast_dtype or self.x_aD.dtype


class Replicas:
    """A re-run module and owner per (layer, expert), built at its first audit and loaded at each (a
    deep copy and a fused AdamW per audit cost more than the re-run itself on small experts)."""

    def __init__(self):
        self.built: dict[tuple[str, int], tuple[torch.nn.Module, ExpertOwner]] = {}

    def get(self, pool: ExpertPool, layer: str, expert: int) -> tuple[torch.nn.Module, ExpertOwner]:
        if (layer, expert) not in self.built:
            module, settings = pool.expert_replica(expert)
            self.built[(layer, expert)] = (module, ExpertOwner(module, settings))
        return self.built[(layer, expert)]


@dataclass(frozen=True)
class Verdict:
    passed: bool
    check: str  # "output", "step", "refused", "commitment"
    evidence: dict


def audit_call(
    pool: ExpertPool,
    call: SampledCall,
    tolerances: tuple[float, float],
    timeout: float,
    replicas: Replicas | None = None,
) -> Verdict:
    """Run every check on `call`; the first that fails decides the verdict and its evidence."""
    output_tolerance, step_tolerance = tolerances
    where = {"layer": call.layer, "expert": call.expert, "step": call.step, "version": call.version}
    try:
        answer = pool.audit(call.expert, call.version, timeout)
    except AuditRefused as refusal:
        return Verdict(False, "refused", {**where, "reason": str(refusal)[:200]})
    refused = _commitment_failure(pool, call, answer, where)
    if refused is not None:
        return refused
    replicas = replicas or Replicas()
    module, owner = replicas.get(pool, call.layer, call.expert)
    _load_params(module, answer.state.params)
    y_aD = _rerun(module, call)
    gap = relative_gap(call.sketch_aK, row_sketch_AK(y_aD))
    if not gap <= output_tolerance:
        explained = _explain(pool, call, timeout, output_tolerance, replicas)
        evidence = _evidence(where, answer, call, gap)
        return Verdict(False, "output", {**evidence, "tolerance": output_tolerance, **explained})
    step_gap = _step_gap(module, owner, y_aD, call, answer)
    if step_gap is None or not step_gap <= step_tolerance:
        reason = "no version committed after this one" if step_gap is None else round(step_gap, 6)
        evidence = _evidence(where, answer, call, gap)
        return Verdict(False, "step", {**evidence, "step_gap": reason, "tolerance": step_tolerance})
    return Verdict(True, "output", {**where, "gap": round(gap, 6), "step_gap": round(step_gap, 6)})


def _evidence(where: dict, answer: AuditAnswer, call: SampledCall, gap: float) -> dict:
    """What a failed re-run records: digests of the parameters and the output, and the output's gap
    (computed for failures only: most audits pass)."""
    return {
        **where,
        "params": digest(answer.state.sketch_P),
        "output": digest(call.sketch_aK),
        "gap": round(gap, 6),
    }


def _commitment_failure(
    pool: ExpertPool, call: SampledCall, answer: AuditAnswer, where: dict
) -> Verdict | None:
    """The answered version's parameters, and the next commitment the answer names, must be the ones
    the owner published; a version it announced without a commitment fails too."""
    versions = [(call.version, answer.state.sketch_P), (answer.next_version, answer.next_sketch_P)]
    for version, answered in versions:
        named = {} if version == call.version else {"next_version": version}
        if version is not None and pool.missing_commitment(call.expert, version):
            return Verdict(
                False, "commitment", {**where, **named, "published": None, "answered": digest(answered)}
            )
        published = pool.published_commitment(call.expert, version) if version is not None else None
        if published is not None and not relative_gap(answered, published) <= SAME_SKETCH:
            evidence = {**named, "published": digest(published), "answered": digest(answered)}
            return Verdict(False, "commitment", {**where, **evidence})
    return None


def _load_params(module: torch.nn.Module, params: dict[str, torch.Tensor]) -> None:
    """`params` into the replica in one fused copy (`load_state_dict` walks the module per audit);
    names and shapes must match, as `load_state_dict(strict=True)` would insist."""
    named = dict(module.named_parameters())
    if set(named) != set(params) or any(named[n].shape != t.shape for n, t in params.items()):
        raise ValueError(f"audited parameters {sorted(params)} do not fit the expert's {sorted(named)}")
    with torch.no_grad():
        torch._foreach_copy_([named[n] for n in params], list(params.values()))


def _rerun(module: torch.nn.Module, call: SampledCall) -> torch.Tensor:
    device = call.x_aD.device.type
    autocast = (
        torch.autocast(device, dtype=call.autocast_dtype) if call.autocast_dtype else contextlib.nullcontext()
    )
    if any(param.device != call.x_aD.device for param in module.parameters()):
        module.to(call.x_aD.device)
    with torch.enable_grad(), autocast:
        return module(call.x_aD)


def _step_gap(module, owner: ExpertOwner, y_aD, call: SampledCall, answer: AuditAnswer) -> float | None:
    """Relative gap between the parameter change the owner committed to (version v → its next) and
    the owner's own step replayed from version v on the call's output gradient; None when the replay
    steps but the owner committed to no later version (it stopped learning)."""
    if call.grad_y_aD is None:  # the outputs got no gradient (no backward reached them): nothing to replay
        return 0.0
    load_optimizer_snapshot(owner.optimizer, answer.state.optimizer)  # torch's own deep-copies the state
    owner.zero_grad()
    y_aD.backward(call.grad_y_aD.to(y_aD.dtype))
    report = owner.step()
    if report.skipped:  # a non-finite gradient: the honest owner skips too, and keeps its version
        return 0.0 if answer.next_version is None else 1.0
    if answer.next_version is None or answer.next_sketch_P is None:
        return None
    before_P = answer.state.sketch_P
    replayed = {name: p.detach() for name, p in module.named_parameters()}
    return relative_gap(answer.next_sketch_P - before_P, param_sketch_P(replayed) - before_P)


def _explain(
    pool: ExpertPool, call: SampledCall, timeout: float, tolerance: float, replicas: Replicas
) -> dict:
    """What a failed output matches instead: another expert's answer on these inputs, or earlier rows."""
    copied = _copied_expert(pool, call, timeout, tolerance, replicas)
    if copied is not None:
        return {"copy_of": copied}
    replayed = _replayed_rows(call)
    return {"replay_of": replayed} if replayed else {}


def _copied_expert(
    pool: ExpertPool, call: SampledCall, timeout: float, tolerance: float, replicas: Replicas
) -> int | None:
    for peer, version in enumerate(call.versions):
        if peer == call.expert or version < 0:
            continue
        try:
            answer = pool.audit(peer, version, timeout)
        except AuditRefused:
            continue
        module, _ = replicas.get(pool, call.layer, peer)
        _load_params(module, answer.state.params)
        with torch.no_grad():
            gap = relative_gap(call.sketch_aK, row_sketch_AK(_rerun(module, call)))
        if gap <= tolerance:
            return peer
    return None


def _replayed_rows(call: SampledCall) -> dict | None:
    """The earliest call whose rows the answer repeats for other inputs (zero rows do not count: they
    are no one's answer), with the number of such rows; None when no row repeats."""
    out_aK, in_aK = call.sketch_aK.double(), row_sketch_AK(call.x_aD).double()
    out_scale_a1 = out_aK.norm(dim=1, keepdim=True)
    in_scale_a1 = in_aK.norm(dim=1, keepdim=True)
    for earlier in sorted(call.earlier, key=lambda earlier: earlier.step):
        step, (rows_hK, inputs_hK) = earlier.step, earlier.sketches(call.expert)
        same_out_ah = torch.cdist(out_aK, rows_hK.double()) <= SAME_ROW * out_scale_a1
        other_in_ah = torch.cdist(in_aK, inputs_hK.double()) > SAME_ROW * in_scale_a1
        repeated_a = (same_out_ah & other_in_ah).any(dim=1) & (out_scale_a1[:, 0] > 0)
        if bool(repeated_a.any()):
            return {"step": step, "rows": int(repeated_a.sum())}
    return None
