"""The audit config (Hydra group `audit`): how often validators audit, what an owner keeps, what a
failure costs. Defaults are off (`rate: 0`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe.errors import ConfigError
from router.typed_config import typed_config

# Honest floating-point noise, as a relative gap of sketches: outputs re-run elsewhere (other thread
# counts, fused kernels, another process) and one replayed AdamW step (whose update is sign-like early
# on, so elements with near-zero gradients may flip under noise). Measured gaps of honest runs sit
# far below these; dishonest answers sit near 1 (see tests/incentives/test_audits.py). bf16: an honest
# 4-expert `clusters` run re-run by the auditor reached a gap of 0.061 (a call whose rows cancel in the
# projections), so bf16 and fp16 get a wider margin.
OUTPUT_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 0.2, torch.float16: 0.1}
STEP_TOLERANCE = {torch.float32: 5e-2, torch.float64: 1e-3, torch.bfloat16: 0.5, torch.float16: 0.3}


@dataclass
class AuditConfig:
    """`rate`: the fraction of calls (expert × layer × step) validators re-run, drawn after the reply
    from a stream the miners cannot see. `window`: versions every owner keeps for audits (and steps of
    calls validators keep sketches of, to recognise replayed answers). `slash`: the fraction of a miner's balance slashed
    (burned) per block in which it failed an audit; its incentive of that epoch is zeroed too.
    `ban_after`: failures after which a miner is banned (zero incentive) for 1, 2, 4, ... epochs.
    `tolerance`: a factor on the gaps honest floating-point noise may cause (per dtype, calibrated).
    `timeout`: seconds an owner has to answer an audit; no answer is a failure."""

    rate: float = 0.0
    window: int = 4
    slash: float = 0.1
    ban_after: int = 3
    tolerance: float = 1.0
    timeout: float = 10.0


def as_audit_config(cfg) -> AuditConfig:
    """`cfg` (a config node, a mapping or None) as a checked `AuditConfig`."""
    audit = AuditConfig() if cfg is None else typed_config(AuditConfig, cfg, "audit")
    checks = [
        (0 <= audit.rate <= 1, "rate", "must be in [0, 1]"),
        (audit.window >= 1, "window", "must be at least 1"),
        (0 <= audit.slash <= 1, "slash", "must be in [0, 1]"),
        (audit.ban_after >= 1, "ban_after", "must be at least 1"),
        (audit.tolerance > 0, "tolerance", "must be > 0"),
        (audit.timeout > 0, "timeout", "must be > 0"),
    ]
    for ok, key, rule in checks:
        if not ok:
            raise ConfigError(f"audit.{key}={getattr(audit, key)!r} {rule}")
    return audit


def tolerances(dtype: torch.dtype, factor: float) -> tuple[float, float]:
    """(output, step) tolerances for calls computed in `dtype`."""
    return OUTPUT_TOLERANCE.get(dtype, 5e-2) * factor, STEP_TOLERANCE.get(dtype, 0.5) * factor
