"""Commitments: what a miner's replies and optimizer steps bind it to, so that audits can check them.

- **Outputs.** `row_sketch_AK` projects every row onto K fixed random directions: one [A, D] × [D, K]
  matmul for a whole layer's call, K/D of the output's size, computed on the device with no host sync.
  A pool sketches each call's outputs *as received* (so a miner cannot commit to one answer and send
  another) and its inputs (so a replayed answer, the same output for other inputs, shows), and keeps
  them with the version of the parameters that produced each expert's answer (`CallRecord`). An
  auditor re-runs the expert and compares sketches within a tolerance: honest floating-point noise
  (thread counts, devices, fused kernels) moves a sketch by ~1e-6 of its size in fp32 and ~1e-2 in
  bf16; a different answer moves it by the size of the difference. `digest` hashes a coarsely
  quantised sketch (blake2b) for the ledger's evidence.
- **Parameters.** After each optimizer step an owner commits to its new parameters: `param_sketch_P`,
  K bilinear projections u_kᵀ W v_k of every parameter (a vector is a 1-row matrix), and its
  `AuditTrail` keeps what an audit of its last `window` versions needs: the parameters and optimizer
  state of each version, so an auditor can re-run a call at the version it was answered with and
  replay the step from version v to v+1.

The random directions come from `router.seeds` (public: a commitment is a checksum a verifier can
recompute, not a secret). Legend: A rows of a call (assignments), D model width, K directions,
P parameter tensors × K, O/I a parameter matrix's rows and columns.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from router.seeds import torch_generator

SKETCH_DIRECTIONS = 4  # K: output sketch columns per row, and bilinear projections per parameter
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
    """K bilinear projections u_kᵀ W v_k per parameter, in name order (float32: a step moves a sketch
    by ~1e-3 of its size, resolved to ~1e-4 of itself; float64 GEMMs are 1000x slower on some CPUs)."""
    parts = []
    for name in sorted(params):
        w_OI = params[name].detach().float().reshape(params[name].shape[0] if params[name].ndim else 1, -1)
        u_KO = _directions(SKETCH_DIRECTIONS, w_OI.shape[0], "param-rows", str(w_OI.device))
        v_KI = _directions(SKETCH_DIRECTIONS, w_OI.shape[1], "param-cols", str(w_OI.device))
        parts.append(((u_KO @ w_OI) * v_KI).sum(dim=1))
    return torch.cat(parts).cpu() if parts else torch.zeros(0)


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
    """What a pool keeps of its latest training call for the auditor (references; copies only of what
    an audit samples). `versions[e]`: the version expert e answered with (with no rows: its latest
    known version); -1 when it failed."""

    step: int
    sizes: list[int]
    versions: list[int]
    x_AD: torch.Tensor  # the call's inputs, detached
    sketch_AK: torch.Tensor  # row sketches of the outputs as received
    input_sketch_AK: torch.Tensor  # row sketches of the inputs
    autocast_dtype: torch.dtype | None  # the autocast the call ran under (None: off)
    grad_y_AD: torch.Tensor | None = None  # the gradient the outputs received in the training backward


def record_call(step: int, sizes: list[int], versions: list[int], x_AD: torch.Tensor, y_AD: torch.Tensor):
    """The `CallRecord` of one call: sketches of its inputs and received outputs, and the autocast state."""
    device = x_AD.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return CallRecord(step, list(sizes), list(versions), x_AD.detach(), row_sketch_AK(y_AD),
                      row_sketch_AK(x_AD), autocast)  # fmt: skip


@dataclass(frozen=True)
class OwnerState:
    """One committed version of an owner: its parameters, optimizer state and parameter commitment."""

    version: int
    params: dict[str, torch.Tensor]
    optimizer: dict  # `torch.optim.Optimizer.state_dict()`, tensors copied
    sketch_P: torch.Tensor


class AuditTrail:
    """The states of an owner's last `window` + 1 versions (so that a step v → v+1 up to `window` steps
    back can be replayed); older ones are dropped, and an audit asking for them is refused."""

    def __init__(self, window: int):
        if window < 1:
            raise ValueError(f"audit window {window} must be at least 1")
        self.window = window
        self.states: OrderedDict[int, OwnerState] = OrderedDict()

    def record(self, version: int, module: nn.Module, optimizer: torch.optim.Optimizer) -> OwnerState:
        """Commit to the owner's state at `version` (after its step); replaces a state of that version."""
        names, tensors = zip(*((name, p.detach()) for name, p in module.named_parameters()), strict=True)
        params = dict(zip(names, copied(list(tensors)), strict=True))
        state = OwnerState(version, params, optimizer_snapshot(optimizer), param_sketch_P(params))
        self.states[version] = state
        self.states.move_to_end(version)
        while len(self.states) > self.window + 1:
            self.states.popitem(last=False)
        return state

    def at(self, version: int) -> OwnerState | None:
        return self.states.get(version)

    @property
    def latest(self) -> OwnerState | None:
        return next(reversed(self.states.values()), None)


def copied(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `tensors`, bit for bit, in one fused call (a per-step commit cannot afford one clone
    per tensor on small experts)."""
    return list(torch._foreach_mul(tensors, 1.0)) if tensors else []


def optimizer_snapshot(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()`'s layout with its tensors copied, built without its per-call overhead."""
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
    copies = dict(zip(tensor_keys, copied([by_index[i][key] for i, key in tensor_keys]), strict=True))
    state = {
        i: {key: copies.get((i, key), value) for key, value in entry.items()} for i, entry in entries if entry
    }
    return {"state": state, "param_groups": groups}


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
        kept = list(trail.states) if trail is not None else []
        raise AuditRefused(f"version {version} is not kept (kept: {kept})")
    later = [v for v in trail.states if v > version]
    following = trail.at(min(later)) if later else None
    if following is None:
        return AuditAnswer(state, None, None)
    return AuditAnswer(state, following.version, following.sketch_P)


def well_formed_sketch(values, size: int) -> bool:
    """A parameter commitment off the wire: `size` finite floats."""
    return (
        isinstance(values, list)
        and len(values) == size
        and all(isinstance(v, float) and math.isfinite(v) for v in values)
    )
