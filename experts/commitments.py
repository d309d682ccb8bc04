"""Commitments: what a miner's replies and optimizer steps bind it to, so that audits can check them.

- **Outputs.** `row_sketch_AK` projects every row onto K fixed random directions: one [A, D] × [D, K]
  matmul, K/D of the output's size, computed on the device with no host sync. A pool keeps each
  call's outputs *as received* (so a miner cannot commit to one answer and send another) and its
  inputs (so a replayed answer, the same output for other inputs, shows), by reference, with the
  version of the parameters that produced each expert's answer (`CallRecord`); the auditor sketches
  the rows it samples, and those of earlier calls only when a failed answer needs explaining. An
  auditor re-runs the expert and compares sketches within a tolerance: honest floating-point noise
  (thread counts, devices, fused kernels) moves a sketch by ~1e-6 of its size in fp32 and ~1e-2 in
  bf16; a different answer moves it by the size of the difference. `digest` hashes a coarsely
  quantised sketch (blake2b) for the ledger's evidence.
- **Parameters.** After each optimizer step an owner commits to its new parameters: `param_sketch_P`,
  K² bilinear projections u_iᵀ W v_j of every parameter (a vector is a one-column matrix), and its
  `AuditTrail` keeps what an audit of its last `window` versions needs to rebuild the parameters
  and optimizer state of each version (a snapshot every few steps and the gradients of the steps
  since), so an auditor can re-run a call at the version it was answered with and replay the step
  from version v to v+1.

The random directions come from `router.seeds` (public: a commitment is a checksum a verifier can
recompute, not a secret). Legend: A rows of a call (assignments), D model width, K directions,
P parameter tensors × K, O/I a parameter matrix's rows and columns.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from experts.optim import step_optimizers
from router.seeds import torch_generator

SNAPSHOT_EVERY = 8  # versions between an owner's state copies, at least (see `AuditTrail`)
SKETCH_DIRECTIONS = 4  # K: output sketch columns per row, and directions per side of a parameter
DIGEST_QUANTUM = 2.0**-8  # relative step of the quantised sketch that `digest` hashes


@functools.lru_cache(maxsize=256)
def _directions(rows: int, cols: int, name: str, device: str) -> torch.Tensor:
    generator = torch_generator(0, "commitment", name, rows, cols)
    return (torch.randn(rows, cols, generator=generator) / rows**0.5).to(device)


def row_sketch_AK(t_AD: torch.Tensor) -> torch.Tensor:
    """Each row of `t_AD` projected onto K fixed random directions (float32, detached)."""
    q_DK = _directions(t_AD.shape[-1], SKETCH_DIRECTIONS, "rows", str(t_AD.device))
    return t_AD.detach().float() @ q_DK


def param_sketch_P(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """K² bilinear projections u_iᵀ W v_j per parameter, in name order (float32: a step moves a sketch
    by ~1e-3 of its size, resolved to ~1e-4 of itself; float64 GEMMs are 1000x slower on some CPUs)."""
    return sketch_of([params[name] for name in sorted(params)])


def sketch_of(tensors: list[torch.Tensor], directions: list | None = None) -> torch.Tensor:
    """`param_sketch_P` of parameters already in name order: two small GEMMs per parameter, U W V
    ([K, K]), and nothing else (every owner pays this after every step, reading all its parameters
    once, so `directions`, from `sketch_directions`, may come precomputed)."""
    if not tensors:
        return torch.zeros(0)
    directions = directions or sketch_directions(tensors)
    with torch.no_grad():
        parts = [
            torch.mm(torch.mm(u_KO, _as_matrix(t)), v_IK)
            for t, (u_KO, v_IK) in zip(tensors, directions, strict=True)
        ]
        return torch.stack(parts).reshape(-1).cpu()


def stacked_sketch_GP(buffers: list[torch.Tensor]) -> torch.Tensor:
    """`sketch_of` every row of `buffers` (per parameter in name order, [G, *shape]: G experts'
    parameters stacked, experts/stacking.py), in two batched matmuls per parameter: [G, P]."""
    with torch.no_grad():
        parts = []
        for buffer in buffers:
            w_GOI = _as_matrices(buffer)
            u_KO, v_IK = _bilinear_directions(tuple(w_GOI.shape[1:]), str(buffer.device))
            parts.append(torch.matmul(torch.matmul(u_KO, w_GOI), v_IK))
        return torch.stack(parts, dim=1).reshape(buffers[0].shape[0], -1).cpu()


def sketch_directions(tensors: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (U, V) pair `sketch_of` projects each of `tensors` with."""
    return [_bilinear_directions(tuple(_as_matrix(t).shape), str(t.device)) for t in tensors]


@functools.lru_cache(maxsize=256)
def _bilinear_directions(shape: tuple[int, int], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = shape
    u_KO = _directions(SKETCH_DIRECTIONS, rows, "param-rows", device)
    return u_KO, _directions(SKETCH_DIRECTIONS, cols, "param-cols", device).T.contiguous()


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """`t` as the float32 matrix a sketch projects: [first dim, the rest] (a vector is a column)."""
    return _as_matrices(t.unsqueeze(0))[0]


def _as_matrices(t_G: torch.Tensor) -> torch.Tensor:
    """`_as_matrix` of each row of `t_G` (G tensors of one shape, stacked), as one [G, O, I] tensor."""
    if t_G.ndim == 3 and t_G.dtype == torch.float32:
        return t_G
    rows = t_G.shape[1] if t_G.ndim > 1 else 1
    return t_G.detach().float().reshape(t_G.shape[0], rows, -1)


def digest(t: torch.Tensor) -> str:
    """blake2b of `t` quantised to steps of `DIGEST_QUANTUM` × its largest magnitude: a short identity
    for a sketch in the ledger (comparisons themselves use the sketch and a tolerance)."""
    values = t.detach().double().cpu().reshape(-1)
    scale = float(values.abs().max()) if values.numel() else 0.0
    steps = torch.round(values / (scale * DIGEST_QUANTUM)) if scale > 0 else torch.zeros_like(values)
    data = steps.to(torch.int64).numpy().tobytes() + repr(scale.hex()).encode()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def relative_gap(committed: torch.Tensor, reference: torch.Tensor) -> float:
    """‖committed − reference‖ / ‖reference‖ (the gap itself when the reference is zero)."""
    committed, reference = committed.double().cpu(), reference.double().cpu()
    scale = float(reference.norm())
    gap = float((committed - reference).norm())
    return gap / scale if scale > 0 else gap


@dataclass
class CallRecord:
    """What a pool keeps of its latest training call for the auditor: references to its inputs and to
    the outputs as received (a pool never writes them again; sketches are computed only for the rows
    an audit samples, or for replay evidence). `versions[e]`: the version expert e answered with (with
    no rows: its latest known version); -1 when it failed."""

    step: int
    sizes: list[int]
    versions: list[int]
    x_AD: torch.Tensor  # the call's inputs, detached
    y_AD: torch.Tensor  # the call's outputs as received, detached
    autocast_dtype: torch.dtype | None  # the autocast the call ran under (None: off)
    grad_y_AD: torch.Tensor | None = None  # the gradient the outputs received in the training backward


def record_call(step: int, sizes: list[int], versions: list[int], x_AD: torch.Tensor, y_AD: torch.Tensor):
    """The `CallRecord` of one call: its inputs and received outputs, and the autocast state."""
    device = x_AD.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return CallRecord(step, list(sizes), list(versions), x_AD.detach(), y_AD.detach(), autocast)


@dataclass(frozen=True)
class OwnerState:
    """One committed version of an owner: its parameters, optimizer state and parameter commitment."""

    version: int
    params: dict[str, torch.Tensor]
    optimizer: dict  # `torch.optim.Optimizer.state_dict()`'s layout, tensors copied
    sketch_P: torch.Tensor


@dataclass(frozen=True)
class _Snapshot:
    """A copied state of an owner: its parameters (in `named_parameters` order) and optimizer state."""

    version: int
    params: list[torch.Tensor]
    optimizer: dict

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor it holds (buffers the next snapshot may be copied into)."""
        entries = self.optimizer["state"].values()
        return self.params + [t for entry in entries for t in entry.values() if torch.is_tensor(t)]


@dataclass(frozen=True)
class _Step:
    """What turned version v into v + 1: the gradients the optimizer stepped on (references: the owner
    drops them after its step, `set_to_none`, so nothing writes them again) and its hyperparameters."""

    grads: list[torch.Tensor | None]
    groups: list[dict]


class AuditTrail:
    """The parameter commitments of an owner's last `window` + 1 versions, and what rebuilds the state
    of any of them (so that a step v → v+1 up to `window` steps back can be replayed); older ones are
    dropped, and an audit asking for them is refused. `record` is called after every optimizer step.

    A copy of the whole state every step would cost more than the step itself on small experts (three
    copies of the parameters' size, on every owner, while audits sample ~5 % of calls). So the trail
    copies the state every `max(window, SNAPSHOT_EVERY)` versions (rarer copies, longer replays at
    audits: 8 balances them at a 5 % audit rate) and keeps, for the steps since, only references to the
    gradients the optimizer stepped on; `at(v)` replays the steps from the snapshot before v on a
    scratch copy of the owner's module and optimizer, as Gensyn's proof-of-learning rebuilds a
    checkpoint from the last one kept. The commitment of every version is still computed and kept
    (published) when it is recorded, so the owner is bound to each version before any audit is drawn;
    an audit checks the rebuilt state against it."""

    def __init__(self, window: int):
        if window < 1:
            raise ValueError(f"audit window {window} must be at least 1")
        self.window = window
        self.commitments: OrderedDict[int, torch.Tensor] = OrderedDict()  # version -> sketch_P
        self.snapshots: list[_Snapshot] = []  # oldest first; the first is at or before every kept version
        self.steps: dict[int, _Step] = {}  # version v -> the step from v to v + 1
        self.names: list[str] = []  # the parameters' names, in the optimizer's order
        self._by_name: list[int] = []  # the optimizer's parameters in name order (the sketch's order)
        self._directions: list = []  # `sketch_directions` of the parameters in name order
        self._owner: tuple[nn.Module, torch.optim.Optimizer] | None = None
        self._scratch: tuple[nn.Module, torch.optim.Optimizer] | None = None  # for replays, built once
        self._spare: list[torch.Tensor] = []  # a dropped snapshot's tensors, reused by the next one

    def record(
        self,
        version: int,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        sketch_P: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Commit to the owner's state at `version` (after its step); returns the commitment, `sketch_P`
        when the caller computed it already (`param_sketch_P` of these parameters, batched over a
        pool's owners). A version that does not follow the last one recorded (the first, a load)
        starts a new history."""
        latest = next(reversed(self.commitments), None)
        follows = latest is not None and latest == version - 1 and self._owner == (module, optimizer)
        if not follows:
            self._start(module, optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if sketch_P is None:
            sketch_P = sketch_of([params[i] for i in self._by_name], self._directions)
        if follows:
            groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
            self.steps[latest] = _Step([p.grad for p in params], groups)
        if not self.snapshots or version - self.snapshots[-1].version >= max(self.window, SNAPSHOT_EVERY):
            self.snapshots.append(self._snapshot(version, params, optimizer))
        self.commitments[version] = sketch_P
        while len(self.commitments) > self.window + 1:
            self.commitments.popitem(last=False)
        self._forget_before(next(iter(self.commitments)))
        return sketch_P

    def _start(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """A new history: nothing recorded before it applies."""
        self.commitments.clear()
        self.steps.clear()
        self.snapshots.clear()
        self._owner, self._scratch = (module, optimizer), None
        name_of = {id(p): name for name, p in module.named_parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if sorted(map(id, params)) != sorted(name_of):
            raise ValueError("an audit trail needs an optimizer stepping exactly the module's parameters")
        self.names = [name_of[id(p)] for p in params]  # in the optimizer's order
        self._by_name = sorted(range(len(params)), key=lambda i: self.names[i])
        self._directions = sketch_directions([params[i] for i in self._by_name])

    def _snapshot(self, version: int, params: list[torch.Tensor], optimizer) -> _Snapshot:
        live = [p.detach() for p in params]
        spare, self._spare = self._spare, []  # copying into them spares the allocator's page faults
        params_copy = copied(live, into=spare[: len(live)])
        return _Snapshot(version, params_copy, optimizer_snapshot(optimizer, into=spare[len(live) :]))

    def _forget_before(self, oldest: int) -> None:
        """Drop the snapshots and steps no kept version needs (the snapshot at or before `oldest` stays)."""
        while len(self.snapshots) > 1 and self.snapshots[1].version <= oldest:
            self._spare = self.snapshots.pop(0).tensors()
        while self.steps and next(iter(self.steps)) < self.snapshots[0].version:  # recorded in order
            del self.steps[next(iter(self.steps))]

    def commitment(self, version: int) -> torch.Tensor | None:
        """The parameter commitment recorded for `version`, if still kept."""
        return self.commitments.get(version)

    @property
    def latest(self) -> tuple[int, torch.Tensor] | None:
        """(version, commitment) of the latest version recorded."""
        return next(reversed(self.commitments.items()), None)

    def at(self, version: int) -> OwnerState | None:
        """The state of `version`, rebuilt from the snapshot before it (None when it is not kept). Its
        tensors are the trail's scratch copy, valid until the next `at`: read them or copy them."""
        if version not in self.commitments:
            return None
        base = max((s for s in self.snapshots if s.version <= version), key=lambda s: s.version)
        module, optimizer = self._scratch_at(base)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for step_version in range(base.version, version):
            step = self.steps[step_version]
            for param, grad in zip(params, step.grads, strict=True):
                param.grad = grad
            for group, saved in zip(optimizer.param_groups, step.groups, strict=True):
                group.update(saved)
            step_optimizers([optimizer])  # as the owner stepped: the same arithmetic as optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        named = dict(zip(self.names, [p.detach() for p in params], strict=True))
        return OwnerState(version, named, optimizer_snapshot(optimizer, share=True), param_sketch_P(named))

    def _scratch_at(self, base: _Snapshot) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The scratch module and optimizer (copies of the owner's), loaded with `base`."""
        if self._scratch is None:
            self._scratch = copy.deepcopy(self._owner)  # together: the copy steps the copied parameters
        module, optimizer = self._scratch
        with torch.no_grad():
            torch._foreach_copy_(
                [p for group in optimizer.param_groups for p in group["params"]], base.params
            )
        load_optimizer_snapshot(optimizer, base.optimizer)
        return module, optimizer


def copied(tensors: list[torch.Tensor], into: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Copies of `tensors`, bit for bit, in one fused call (a per-step commit cannot afford one clone
    per tensor on small experts); into the buffers `into` when they match the tensors one for one."""
    if not tensors:
        return []
    fits = into and len(into) == len(tensors)
    if fits and all(b.shape == t.shape and b.dtype == t.dtype for b, t in zip(into, tensors, strict=True)):
        torch._foreach_copy_(into, tensors)
        return list(into)
    return list(torch._foreach_mul(tensors, 1.0))


def optimizer_snapshot(
    optimizer: torch.optim.Optimizer, into: list[torch.Tensor] | None = None, *, share: bool = False
) -> dict:
    """`optimizer.state_dict()`'s layout with its tensors copied (into the buffers `into` where they
    match; `share`: not copied), built without its per-call overhead."""
    groups, entries, index = [], [], 0
    for group in optimizer.param_groups:
        params = group["params"]
        groups.append(
            {
                **{k: v for k, v in group.items() if k != "params"},
                "params": list(range(index, index + len(params))),
            }
        )
        entries += [(index + i, optimizer.state.get(p, {})) for i, p in enumerate(params)]
        index += len(params)
    tensor_keys = [(i, key) for i, entry in entries for key, value in entry.items() if torch.is_tensor(value)]
    by_index = dict(entries)
    live = [by_index[i][key] for i, key in tensor_keys]
    copies = dict(zip(tensor_keys, live if share else copied(live, into), strict=True))
    state = {
        i: {key: copies.get((i, key), value) for key, value in entry.items()} for i, entry in entries if entry
    }
    return {"state": state, "param_groups": groups}


def load_optimizer_snapshot(optimizer: torch.optim.Optimizer, snapshot: dict) -> None:
    """`snapshot` (`optimizer_snapshot`'s layout) into `optimizer`, copied (into its own state tensors
    where they match) so that stepping leaves the snapshot as it was."""
    placed = [(p, group) for group in optimizer.param_groups for p in group["params"]]
    targets, sources = [], []
    for index, (param, group) in enumerate(placed):
        entry, live = snapshot["state"].get(index), optimizer.state.get(param)
        if entry is None:
            optimizer.state.pop(param, None)
        elif live is not None and _same_tensors(live, entry):
            targets += [live[k] for k, v in entry.items() if torch.is_tensor(v)]
            sources += [v for v in entry.values() if torch.is_tensor(v)]
        else:
            optimizer.state[param] = {k: _placed_like(v, k, param, group) for k, v in entry.items()}
    if targets:
        torch._foreach_copy_(targets, sources)
    for group, saved in zip(optimizer.param_groups, snapshot["param_groups"], strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})


def _placed_like(value: object, key: str, param: torch.Tensor, group: dict) -> object:
    """A saved state value copied where torch's `Optimizer.load_state_dict` puts it: on the parameter's
    device (state off the wire is on the host), floats in its dtype; `step` in float32 on that device
    for fused or capturable optimizers, else as saved."""
    if not torch.is_tensor(value):
        return value
    if key == "step":
        on_device = group.get("fused") or group.get("capturable")
        return value.to(dtype=torch.float32, device=param.device, copy=True) if on_device else value.clone()
    dtype = param.dtype if param.is_floating_point() else value.dtype
    return value.to(dtype=dtype, device=param.device, copy=True)


def _same_tensors(live: dict, entry: dict) -> bool:
    """Whether `live` holds a tensor of the same shape and dtype under each of `entry`'s keys (and
    the same other values)."""
    if live.keys() != entry.keys():
        return False
    return all(
        torch.is_tensor(live[k]) and live[k].shape == v.shape and live[k].dtype == v.dtype
        if torch.is_tensor(v)
        else live[k] == v
        for k, v in entry.items()
    )


@dataclass(frozen=True)
class AuditAnswer:
    """An owner's answer to an audit of `version`: that version's state, and the version it committed
    to next with that version's parameter commitment (None when it has not stepped since)."""

    state: OwnerState
    next_version: int | None
    next_sketch_P: torch.Tensor | None


class AuditRefused(Exception):
    """The owner did not answer an audit (the version is gone, it timed out, it is unreachable)."""


def answer_audit(trail: AuditTrail | None, version: int) -> AuditAnswer:
    """What an owner with `trail` answers an audit of `version`; raises `AuditRefused`."""
    state = trail.at(version) if trail is not None else None
    if state is None:
        kept = list(trail.commitments) if trail is not None else []
        raise AuditRefused(f"version {version} is not kept (kept: {kept})")
    later = [v for v in trail.commitments if v > version]
    if not later:
        return AuditAnswer(state, None, None)
    return AuditAnswer(state, min(later), trail.commitments[min(later)])


def well_formed_sketch(values, size: int) -> bool:
    """A parameter commitment off the wire: `size` finite floats."""
    return (
        isinstance(values, list)
        and len(values) == size
        and all(isinstance(v, float) and math.isfinite(v) for v in values)
    )
