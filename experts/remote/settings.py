"""What a worker is told and what it accepts: the run's `WorkerSettings`, sent in WELCOME, and the
worker's own `WorkerLimits`, from its command line, within which it takes them. Meta from a peer
becomes a dataclass only through `typed_meta`, which checks each field's JSON type. Each FORWARD
says in which precision to compute (`autocast_meta` → `autocast_from`).
"""

from __future__ import annotations

import contextlib
import types
import typing
from dataclasses import dataclass, fields

import torch

from experts.errors import WireError
from experts.remote.wire import WireLimits


class RequestError(Exception):
    """A well-formed request a worker cannot serve; answered with ERROR, never fatal."""


HEARTBEAT_RANGE_S = (0.05, 60.0)  # a coordinator's heartbeat_interval is clamped to this
DEFAULT_FRAME_MB, DEFAULT_MESSAGE_MB = 1024.0, 4096.0  # `ProcessTransportConfig` and workers alike


@dataclass
class WorkerSettings:
    """How workers serve, as configured for the run: `ProcessTransportConfig` inherits these fields
    (`transport.cache_size`) and the coordinator sends them in WELCOME. A worker takes them within
    its own limits: the coordinator can tighten its gradient check and cache, never loosen them."""

    max_grad_norm: float = 1e4  # workers reject grad_out with a larger L2 norm; 0: the worker's own bound
    heartbeat_interval: float = 1.0  # seconds between worker heartbeats
    cache_size: int = 256  # forward graphs a worker keeps for backward (oldest evicted)


def launched_limits(cfg) -> WorkerLimits:
    """The own limits a launcher (`transport.launch=local|ray`) gives the workers it starts, from the
    run's `ProcessTransportConfig`: its frame and message caps, cache size and gradient bound (0 or
    less: the worker's default)."""
    grad = {"max_grad_norm": cfg.max_grad_norm} if cfg.max_grad_norm > 0 else {}
    return WorkerLimits(
        max_frame_mb=cfg.max_frame_mb, max_message_mb=cfg.max_message_mb, max_cache=cfg.cache_size, **grad
    )


def settings_meta(settings_cls: type, source: object) -> dict:
    """The fields of dataclass `settings_cls` read from `source` (an instance of it or of a config that
    inherits it), as JSON meta: a config sends only the part a worker takes."""
    return {f.name: getattr(source, f.name) for f in fields(settings_cls)}


@dataclass(frozen=True)
class WorkerLimits:
    """What a worker accepts whatever its coordinator asks: set on its command line, never by the wire."""

    max_frame_mb: float = DEFAULT_FRAME_MB  # one tensor frame
    max_message_mb: float = DEFAULT_MESSAGE_MB  # one message, all frames
    max_expert_mb: float = 4096.0  # parameters of one hosted expert
    max_experts: int = 4096  # experts hosted at once
    max_cache: int = 1024  # forward graphs kept for backward; WELCOME's cache_size is capped at this
    max_grad_norm: float = 1e4  # grad_out norm bound; WELCOME may lower it, never raise or remove it

    def wire(self) -> WireLimits:
        return WireLimits.from_mb(self.max_frame_mb, self.max_message_mb)

    def bound(self, asked: WorkerSettings) -> WorkerSettings:
        """The settings a coordinator asked for, within these limits."""
        grad = min(asked.max_grad_norm, self.max_grad_norm) if asked.max_grad_norm > 0 else self.max_grad_norm
        heartbeat = min(max(asked.heartbeat_interval, HEARTBEAT_RANGE_S[0]), HEARTBEAT_RANGE_S[1])
        return WorkerSettings(grad, heartbeat, max(0, min(asked.cache_size, self.max_cache)))


def typed_meta(settings_cls: type, meta: object, what: str):
    """`meta` (JSON from a peer) as dataclass `settings_cls`, every field checked against its type
    (bool, int, float, str, or one of them or None); WireError naming `what.field` otherwise.
    Never OmegaConf: it would resolve `${...}` interpolations a peer sent."""
    if not isinstance(meta, dict):
        raise WireError(f"{what} must be a JSON object")
    hints = typing.get_type_hints(settings_cls)
    known = {f.name for f in fields(settings_cls)}
    for key, value in meta.items():
        if key not in known:
            raise WireError(f"{what}.{str(key)[:40]}: unknown field; valid: {', '.join(sorted(known))}")
        if not _json_type_fits(value, hints[key]):
            raise WireError(f"{what}.{key}={str(value)[:40]}: expected {hints[key]}")
    return settings_cls(**meta)


def _json_type_fits(value: object, annotation) -> bool:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_json_type_fits(value, option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:  # JSON has one number type; an int is a float too, a bool is neither
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return annotation in (bool, str) and type(value) is annotation


AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_meta(device: torch.device) -> dict:
    """FORWARD meta saying in which precision to compute: `{"autocast": dtype}` when the trainer calls
    under autocast on `device` (`trainer.precision=bf16`), so the owner computes exactly as the
    trainer's own experts would (`transport=process` ≡ `transport=local`); `{}` otherwise."""
    if not torch.is_autocast_enabled(device.type):
        return {}
    return {"autocast": str(torch.get_autocast_dtype(device.type)).removeprefix("torch.")}


def autocast_from(meta: dict, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast that FORWARD `meta` asks for, on this worker's `device` (none when it asks none)."""
    name = meta.get("autocast")
    if name is None:
        return contextlib.nullcontext()
    if name not in AUTOCAST_DTYPES:
        raise WireError(f"autocast={str(name)[:40]!r}; valid: {', '.join(AUTOCAST_DTYPES)}")
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[name])
