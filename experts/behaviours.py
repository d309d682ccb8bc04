"""Miner behaviours: how an expert's owner answers a call, honestly or not; the same in every pool.

`experts.behaviours` maps an expert index to a spec (`{2: lazy, 5: adversarial}`); `parse_behaviours`
turns the specs into small frozen `Behaviour` objects and fails on an unknown one, listing the valid
specs. Every pool answers a call through one function, `run_expert(expert, behaviour, x_aD, call)`:
it computes the honest output (unless the behaviour skips the work) and then lets the behaviour
replace it or fail by raising `ExpertFailure`. Two more hooks complete a behaviour:
`behaviour.learns_at(step)` says whether the owner steps its optimizer (`stale`), and
`behaviour.latency_ms` is an extra reply delay (`slow`): virtual time in `LocalPool`, a real sleep
in a worker. `cheap:r` and `replay:p` save compute while staying close to honest (what audits catch):
the first answers with a rank-r truncated SVD of each weight matrix (cached per parameter version),
the second, with probability p, answers an earlier call's output instead of computing. Random draws come from `router.seeds.torch_generator(seed, "behaviour", layer, step,
expert)`, so a flaky or noisy expert draws the same numbers in either pool and in a resumed run.

Legend: a assignments routed to one expert, D model width; O, I a weight matrix's rows and columns, R rank.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from experts.errors import ConfigError
from experts.rows import RowBuckets
from router.seeds import torch_generator

VALID_SPECS = (
    "honest",
    "noisy:σ",
    "lazy",
    "stale:s",
    "adversarial[:k]",
    "copycat:j",
    "slow:ms",
    "flaky:p",
    "crash:s",
    "intermittent:s",
    "cheap:r",
    "replay:p",
)


class ExpertFailure(Exception):
    """The expert gives no usable answer to this call (crashed, flaked, or its source was unreachable)."""


@dataclass(frozen=True)
class Behaviour:
    """One miner's behaviour: a kind from `VALID_SPECS` and its argument (None where it takes none)."""

    kind: str = "honest"
    arg: float | None = None

    @property
    def spec(self) -> str:
        if self.arg is None:
            return self.kind
        return f"{self.kind}:{int(self.arg) if self.kind in _INTEGER_KINDS else self.arg:g}"

    @property
    def latency_ms(self) -> float:
        """Extra delay before the reply: simulated in-process, slept in a worker."""
        return float(self.arg) if self.kind == "slow" else 0.0

    @property
    def computes(self) -> bool:
        """Whether the owner runs its own expert at all (lazy and copycat miners skip the work)."""
        return self.kind not in ("lazy", "copycat", "cheap", "replay")

    def learns_at(self, step: int) -> bool:
        """Whether the owner steps its optimizer after training step `step` (a stale miner stops at s)."""
        return not (self.kind == "stale" and step >= self.arg)


HONEST = Behaviour()


@dataclass(frozen=True)
class CallContext:
    """What a behaviour may use besides the inputs: the training step, who it is, its random draws,
    and `peer(j, x_aD)`, expert j's output on these inputs (None where j cannot be reached)."""

    step: int
    expert: int
    generator: torch.Generator
    peer: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    module: nn.Module | None = None  # the expert itself, for behaviours that compute their own way


def run_expert(
    expert: nn.Module,
    behaviour: Behaviour,
    x_aD: torch.Tensor,
    call: CallContext,
    rows: RowBuckets | None = None,
) -> torch.Tensor:
    """The output an owner returns for one call of `expert` on `x_aD` (computed in its owner's `rows`
    buckets where given); raises `ExpertFailure`.

    Failures are decided before any work, as a dead or flaky miner would not compute. The returned
    tensor stays in the expert's autograd graph where the behaviour keeps it there, so the pool's
    backward (or a worker's) trains the owner exactly as for an honest answer.
    """
    _raise_if_failing(behaviour, call)
    call = dataclasses.replace(call, module=expert)
    y_aD = None
    if behaviour.computes:
        y_aD = rows.call(expert, x_aD) if rows is not None else expert(x_aD)
    return _RESPONSES[behaviour.kind](behaviour, x_aD, y_aD, call)


def answer_call(
    expert: nn.Module,
    behaviour: Behaviour,
    x_aD: torch.Tensor,
    *,
    seed: int,
    layer: str,
    step: int,
    expert_idx: int,
    peer: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    rows: RowBuckets | None = None,
) -> torch.Tensor:
    """What every pool calls to answer one FORWARD of `expert_idx` at training step `step`: `run_expert`
    with draws from the stream (seed, "behaviour", layer, step, expert_idx). Raises `ExpertFailure`; the
    caller adds `behaviour.latency_ms` (virtual or slept) and asks `behaviour.learns_at(step)` before
    the owner's optimizer step."""
    generator = torch_generator(seed, "behaviour", layer, step, expert_idx)
    return run_expert(expert, behaviour, x_aD, CallContext(step, expert_idx, generator, peer), rows)


def _raise_if_failing(behaviour: Behaviour, call: CallContext) -> None:
    if behaviour.kind == "crash" and call.step >= behaviour.arg:
        raise ExpertFailure(f"crashed at step {int(behaviour.arg)}")
    if behaviour.kind == "flaky" and float(torch.rand((), generator=call.generator)) < behaviour.arg:
        raise ExpertFailure("flaky: no answer this call")


def _noise_like(y_aD: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(y_aD.shape, generator=generator).to(device=y_aD.device, dtype=y_aD.dtype)


def _noisy(b: Behaviour, x_aD, y_aD, call: CallContext) -> torch.Tensor:
    return y_aD + b.arg * _noise_like(y_aD, call.generator)


def _lazy(b: Behaviour, x_aD, y_aD, call: CallContext) -> torch.Tensor:
    return x_aD.new_zeros(x_aD.shape)


def _adversarial(b: Behaviour, x_aD, y_aD, call: CallContext) -> torch.Tensor:
    # Answers −k·y, each row's norm capped at k·‖x‖, and passes gradients straight through as if y
    # had been sent: the owner applies the updates it is sent like an honest miner, which for a
    # negated answer is ascent on the loss, so the lie persists and sharpens. (Through the negation,
    # learning would undo the lie; a frozen liar becomes a fixed random feature the trunk can use.)
    # The cap keeps the ascent bounded, as an adversary avoiding output-norm checks would.
    scale = b.arg if b.arg is not None else 1.0
    lie_aD = -scale * y_aD.detach()
    cap_a1 = scale * x_aD.detach().norm(dim=-1, keepdim=True)
    lie_aD = lie_aD * (cap_a1 / lie_aD.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp_max(1.0)
    return lie_aD + (y_aD - y_aD.detach())  # exactly the lie, with y's gradient path


def _copycat(b: Behaviour, x_aD, y_aD, call: CallContext) -> torch.Tensor:
    if call.peer is None:
        raise ExpertFailure(f"copycat: expert {int(b.arg)} is not reachable from this owner")
    with torch.no_grad():  # the copied expert learns nothing from a copy it did not send
        return call.peer(int(b.arg), x_aD)


def _unchanged(b: Behaviour, x_aD, y_aD, call: CallContext) -> torch.Tensor:
    return y_aD


def _intermittent(b: Behaviour, x_aD, y_aD, call: CallContext) -> torch.Tensor:
    # Works for s steps, then answers zeros (as lazy) for s steps, and so on: a miner whose quality
    # changes over time, which validators must follow and a weight copier lags behind.
    return _lazy(b, x_aD, y_aD, call) if (call.step // int(b.arg)) % 2 else y_aD


def _cheap(b: Behaviour, x_aD, y_aD, call: CallContext) -> torch.Tensor:
    # The low-rank weights stand in for the real ones with the real ones' gradient path (straight
    # through), so the miner keeps learning like an honest one and its answers stay close to honest.
    approx = low_rank_weights(call.module, int(b.arg))
    weights = {
        name: approx[name] + (param - param.detach()) for name, param in call.module.named_parameters()
    }
    return functional_call(call.module, weights, (x_aD,))


def low_rank_weights(module: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """Each parameter's best rank-`rank` approximation (truncated SVD; vectors and matrices of rank
    ≤ `rank` unchanged), cached per parameter and in-place version: an optimizer step refreshes it."""
    cache = _LOW_RANK.setdefault(module, {})
    approx = {}
    for name, param in module.named_parameters():
        key = (param._version, rank, param.data_ptr())
        if name not in cache or cache[name][0] != key:
            cache[name] = (key, _truncated(param.detach(), rank))
        approx[name] = cache[name][1]
    return approx


def _truncated(weight: torch.Tensor, rank: int) -> torch.Tensor:
    if weight.ndim != 2 or rank >= min(weight.shape):
        return weight
    u_OR, s_R, vh_RI = torch.linalg.svd(weight.float(), full_matrices=False)
    return ((u_OR[:, :rank] * s_R[:rank]) @ vh_RI[:rank]).to(weight.dtype)


def _replay(b: Behaviour, x_aD, y_aD, call: CallContext) -> torch.Tensor:
    cached = _LAST_OUTPUT.get(call.module)
    if cached is not None and float(torch.rand((), generator=call.generator)) < b.arg:
        return tiled_rows(cached, x_aD.shape[0]).to(dtype=x_aD.dtype)
    y_aD = call.module(x_aD)
    _LAST_OUTPUT[call.module] = y_aD.detach()
    return y_aD


def tiled_rows(y_nD: torch.Tensor, rows: int) -> torch.Tensor:
    """`rows` rows from `y_nD`: its first rows, repeated as often as needed."""
    repeats = -(-rows // max(y_nD.shape[0], 1))
    return y_nD.repeat(repeats, 1)[:rows]


# Per expert module: what a cheap or replaying miner keeps between calls (gone with the module).
_LOW_RANK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LAST_OUTPUT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_RESPONSES = {
    "honest": _unchanged,
    "noisy": _noisy,
    "lazy": _lazy,
    "stale": _unchanged,
    "adversarial": _adversarial,
    "copycat": _copycat,
    "slow": _unchanged,
    "flaky": _unchanged,
    "crash": _unchanged,
    "intermittent": _intermittent,
    "cheap": _cheap,
    "replay": _replay,
}

# kind -> (argument required?, check on the argument, what the check says)
_ARGUMENTS: dict[str, tuple[bool | None, Callable[[float], bool], str]] = {
    "honest": (False, lambda v: True, ""),
    "lazy": (False, lambda v: True, ""),
    "noisy": (True, lambda v: v >= 0, "σ must be >= 0"),
    "stale": (True, lambda v: v >= 0 and v == int(v), "s must be a step >= 0"),
    "adversarial": (None, lambda v: v > 0, "k must be > 0"),
    "copycat": (True, lambda v: v >= 0 and v == int(v), "j must be an expert index"),
    "slow": (True, lambda v: v >= 0, "ms must be >= 0"),
    "flaky": (True, lambda v: 0 <= v <= 1, "p must be in [0, 1]"),
    "crash": (True, lambda v: v >= 0 and v == int(v), "s must be a step >= 0"),
    "intermittent": (True, lambda v: v >= 1 and v == int(v), "s must be a number of steps >= 1"),
    "cheap": (True, lambda v: v >= 1 and v == int(v), "r must be a rank >= 1"),
    "replay": (True, lambda v: 0 <= v <= 1, "p must be in [0, 1]"),
}
_INTEGER_KINDS = ("stale", "copycat", "crash", "intermittent", "cheap")


def parse_behaviour(spec: str, expert: int | None = None) -> Behaviour:
    """`"noisy:0.1"` → Behaviour("noisy", 0.1); a bad spec raises ConfigError listing the valid ones."""
    where = f" for expert {expert}" if expert is not None else ""
    kind, _, raw_arg = str(spec).strip().partition(":")
    kind = kind.strip().lower()
    if kind not in _ARGUMENTS:
        raise ConfigError(f"unknown behaviour '{spec}'{where}; valid specs: {', '.join(VALID_SPECS)}")
    required, check, rule = _ARGUMENTS[kind]
    if not raw_arg.strip():
        if required:
            raise ConfigError(f"behaviour '{spec}'{where} needs an argument: {_usage(kind)}")
        return Behaviour(kind)
    if required is False:
        raise ConfigError(f"behaviour '{spec}'{where} takes no argument: {_usage(kind)}")
    try:
        value = float(raw_arg)
    except ValueError:
        raise ConfigError(
            f"behaviour '{spec}'{where}: '{raw_arg}' is not a number ({_usage(kind)})"
        ) from None
    if not check(value):
        raise ConfigError(f"behaviour '{spec}'{where}: {rule}")
    return Behaviour(kind, value)


def _usage(kind: str) -> str:
    return next(s for s in VALID_SPECS if s.split(":")[0].removesuffix("[") == kind)


def parse_behaviours(specs: Mapping | None, num_experts: int) -> dict[int, Behaviour]:
    """Expert index → Behaviour for a layer of `num_experts` experts; honest experts are left out."""
    behaviours = {}
    for key, spec in (specs or {}).items():
        expert = int(key)
        if not 0 <= expert < num_experts:
            raise ConfigError(
                f"experts.behaviours names expert {expert}; valid indices: 0..{num_experts - 1}"
            )
        behaviour = parse_behaviour(spec, expert)
        if behaviour.kind == "copycat" and not (0 <= behaviour.arg < num_experts and behaviour.arg != expert):
            raise ConfigError(
                f"experts.behaviours: expert {expert} copies expert {int(behaviour.arg)}; "
                f"it must be another expert in 0..{num_experts - 1}"
            )
        if behaviour != HONEST:
            behaviours[expert] = behaviour
    return behaviours
