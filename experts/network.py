"""What the network does to expert calls, and what a pool tolerates: one rule for both pools.

- `LinkSpec` / `NetworkConfig`: a simulated link per expert (latency distribution, drop probability,
  bandwidth). Workers apply it as real delays before replying; `LocalPool` applies it in virtual time
  through `VirtualNetwork` (deterministic, no sleeping), so a fault experiment means the same thing
  in either transport.
- `FaultPolicy`: timeouts, `k_min`, straggler cut-off, output bound and back-off, as documented values;
  the transport configs inherit it, so a transport config is its own policy.
- `Round`: the acceptance rule of one forward round (who answered, when to stop waiting), driven by
  real time in `RemotePool` and by virtual arrival times in `VirtualNetwork`; its straggler cut-off is
  a fixed constant or follows the measured reply times (`straggler_quantile`, experts/latency.py).
- `FailureMemory`: exponential back-off, so an expert that keeps failing is not asked every step.

Legend: N tokens, A assignments sorted by expert, E experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from experts.errors import ConfigError
from experts.latency import expected_wait_s
from router.seeds import python_rng
from router.typed_config import plain, typed_config

DISTRIBUTIONS = ("constant", "normal", "lognormal", "exponential")


@dataclass
class LinkSpec:
    """One simulated link; a call costs 2 one-way latencies plus its bytes over the bandwidth."""

    latency_ms: float = 0.0  # mean one-way latency
    jitter_ms: float = 0.0  # spread: std for normal/lognormal; ignored by constant and exponential
    distribution: str = "constant"  # constant | normal (clipped at 0) | lognormal | exponential
    drop_prob: float = 0.0  # probability that a reply never arrives
    bandwidth_mbps: float = 0.0  # megabytes (MB) per second; 0 means unlimited

    def __post_init__(self):
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(
                f"network distribution '{self.distribution}'; valid: {', '.join(DISTRIBUTIONS)}"
            )
        if not 0.0 <= self.drop_prob <= 1.0:
            raise ConfigError(f"network drop_prob={self.drop_prob} must be in [0, 1]")
        if min(self.latency_ms, self.jitter_ms, self.bandwidth_mbps) < 0:
            raise ConfigError("network latency_ms, jitter_ms and bandwidth_mbps must be >= 0")

    @property
    def is_ideal(self) -> bool:
        return self.latency_ms == 0 and self.drop_prob == 0 and self.bandwidth_mbps == 0


@dataclass
class NetworkConfig:
    """`default` applies to every expert; `experts` overrides fields per expert index, e.g.
    `{3: {latency_ms: 50, drop_prob: 0.2}}`. The same indices apply in every MoE layer."""

    default: LinkSpec = field(default_factory=LinkSpec)
    experts: Any = None  # {expert index: {field: value}}; Any so Hydra overrides can add keys
    seed: int = 0  # mixed with the run's seed into every link's draws


def link_for(cfg: NetworkConfig | None, expert: int) -> LinkSpec:
    """The link of `expert`: the default with that expert's overrides; unknown keys fail loudly."""
    if cfg is None:
        return LinkSpec()
    overrides = cfg.experts or {}
    override = overrides.get(expert, None) or overrides.get(str(expert), None) or {}
    link = {**plain(cfg.default), **plain(override)}
    return typed_config(LinkSpec, link, f"transport.network.experts.{expert}")


def network_is_ideal(cfg: NetworkConfig | None) -> bool:
    """True when no link adds delay or loss, so a pool can skip the simulation altogether."""
    if cfg is None:
        return True
    return all(link_for(cfg, int(e)).is_ideal for e in [0, *(cfg.experts or {})])


def link_stream(run_seed: int, network: NetworkConfig | None, layer: str, expert: int) -> list:
    """`(seed, *names)` of one expert's link stream in one layer for `router.seeds.python_rng`: the same
    in `VirtualNetwork` and in a worker (HOST carries it as JSON)."""
    return [run_seed, "link", network.seed if network is not None else 0, layer, expert]


def placed_stream(stream: list, host: str | None) -> list:
    """The link stream of an expert placed on `host` by the market: deterministic per (expert, host)."""
    return [*stream, "host", host]


class Link:
    """Samples what the link does to one call; seeded per (layer, expert) so runs repeat exactly."""

    def __init__(self, spec: LinkSpec, stream: Sequence):
        self.spec = spec
        self.rng = python_rng(*stream)  # `stream` comes from `link_stream`

    def one_way_s(self) -> float:
        spec, mean = self.spec, self.spec.latency_ms / 1e3
        if spec.distribution == "constant" or mean == 0:
            return mean
        if spec.distribution == "normal":
            return max(0.0, self.rng.gauss(mean, spec.jitter_ms / 1e3))
        if spec.distribution == "exponential":
            return self.rng.expovariate(1.0 / mean)
        sigma2 = math.log1p((spec.jitter_ms / spec.latency_ms) ** 2)  # lognormal with this mean and std
        return self.rng.lognormvariate(math.log(mean) - sigma2 / 2, math.sqrt(sigma2))

    def sample(self, request_bytes: int, reply_bytes: int) -> float | None:
        """Seconds the network adds to one call, or None when the reply is dropped."""
        if self.spec.is_ideal:
            return 0.0
        dropped = self.spec.drop_prob > 0 and self.rng.random() < self.spec.drop_prob
        delay = self.one_way_s() + self.one_way_s()
        if self.spec.bandwidth_mbps > 0:
            delay += (request_bytes + reply_bytes) / (self.spec.bandwidth_mbps * 1e6)
        return None if dropped else delay


@dataclass
class FaultPolicy:
    """What a pool tolerates from its experts. Times are seconds, back-off is counted in rounds.

    Transport configs inherit these fields (`transport.k_min=2`), so they mean the same in
    `transport=local` (virtual time) and `transport=process` (real time).
    """

    forward_timeout: float = 10.0  # the longest a forward round waits for any expert
    backward_timeout: float = 10.0  # the longest a backward round waits for input gradients
    # answers each token needs before the straggler cut-off starts (fewer when fewer of its experts
    # are still being asked); 0 starts the cut-off at once
    k_min: int = 1
    # once every token has k_min answers, wait this much longer for the rest, then mark those that did
    # not answer as stragglers (failed for this call)
    straggler_cutoff: float = 1.0
    # null: the fixed `straggler_cutoff` above. q in (0, 1]: the cut-off follows the measured latency
    # distribution instead: once k_min is met, the round waits until the q-quantile of the asked experts'
    # expected reply times (the pool's `reply_time_E`) after its start; the fixed cut-off applies while
    # none of them has been measured. q=1 waits for the slowest expected reply, q=0.5 for the median
    straggler_quantile: float | None = None
    # each expert's expected reply time (`pool.reply_time_E`) moves (1 - latency_ema) of the way to every
    # training call's measured reply time
    latency_ema: float = 0.9
    max_output_norm: float = 1e4  # reject outputs whose per-token L2 norm is larger; 0 disables the bound
    # after n consecutive failures an expert is not asked for min(backoff_base * 2**(n-1), backoff_max)
    # rounds (calls); backoff_base=0 disables the memory
    backoff_base: int = 1
    backoff_max: int = 64

    def __post_init__(self):
        if self.k_min < 0:
            raise ConfigError(f"k_min={self.k_min} must be >= 0")
        if min(self.forward_timeout, self.backward_timeout, self.straggler_cutoff) < 0:
            raise ConfigError("forward_timeout, backward_timeout and straggler_cutoff must be >= 0")
        if self.straggler_quantile is not None and not 0.0 < self.straggler_quantile <= 1.0:
            raise ConfigError(f"straggler_quantile={self.straggler_quantile} must be in (0, 1] or null")
        if not 0.0 <= self.latency_ema < 1.0:
            raise ConfigError(f"latency_ema={self.latency_ema} must be in [0, 1)")


class Round:
    """One forward round's rule: answers count until every expert has answered or failed, or the
    deadline passes: `forward_timeout` after the start, cut to `straggler_cutoff` after the moment
    every token has `k_min` answers (or as many as it has experts still in play). With
    `policy.straggler_quantile`, the cut-off is instead that quantile of the asked experts' expected
    reply times `reply_time_E` after the start (never before k_min is met)."""

    def __init__(
        self,
        token_idx_A: torch.Tensor,
        sizes: list[int],
        asked: list[int],
        num_tokens: int,
        policy: FaultPolicy,
        start: float,
        reply_time_E: torch.Tensor | None = None,
    ):
        self.policy = policy
        self.expected_s = expected_wait_s(reply_time_E, asked, policy.straggler_quantile)
        self.start = start
        self.bounds = _slice_bounds(sizes)
        self.token_idx_A = token_idx_A.cpu()
        self.pending = set(asked)
        self.in_play_N = torch.zeros(num_tokens, dtype=torch.int32)
        for e in asked:
            self._add(self.in_play_N, e, 1)
        self.answered_N = torch.zeros(num_tokens, dtype=torch.int32)
        self.deadline = start + policy.forward_timeout
        self.k_min_met_at: float | None = None
        self._check_k_min(start)

    def _add(self, count_N: torch.Tensor, expert: int, amount: int) -> None:
        lo, hi = self.bounds[expert]
        count_N.index_add_(0, self.token_idx_A[lo:hi], torch.full((hi - lo,), amount, dtype=torch.int32))

    def _check_k_min(self, now: float) -> None:
        if self.k_min_met_at is not None:
            return
        need_N = self.in_play_N.clamp(max=self.policy.k_min)
        if bool((self.answered_N >= need_N).all()):
            self.k_min_met_at = now
            self.deadline = min(self.deadline, self.straggler_deadline(now))

    def straggler_deadline(self, now: float) -> float:
        """When stragglers are cut, k_min having been met at `now`."""
        if self.expected_s is None:
            return now + self.policy.straggler_cutoff
        return max(now, self.start + self.expected_s)

    def answer(self, expert: int, now: float) -> None:
        self.pending.discard(expert)
        self._add(self.answered_N, expert, 1)
        self._check_k_min(now)

    def fail(self, expert: int, now: float) -> None:
        if expert in self.pending:
            self.pending.discard(expert)
            self._add(self.in_play_N, expert, -1)
            self._check_k_min(now)

    def expire(self) -> dict[int, str]:
        """Experts still pending at the deadline, with why: cut off as straggler or timed out."""
        reason = "straggler" if self.k_min_met_at is not None else "timeout"
        return dict.fromkeys(sorted(self.pending), reason)


def _slice_bounds(sizes: list[int]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


class FailureMemory:
    """Consecutive failures per expert and the round until which it is not asked again."""

    def __init__(self, num_experts: int, base: int, cap: int):
        self.base, self.cap = base, cap
        self.consecutive = [0] * num_experts
        self.skip_until = [0] * num_experts

    def skipping(self, expert: int, round_no: int) -> bool:
        return round_no < self.skip_until[expert]

    def failed(self, expert: int, round_no: int) -> None:
        self.consecutive[expert] += 1
        if self.base > 0:
            wait = min(self.base * 2 ** (self.consecutive[expert] - 1), self.cap)
            self.skip_until[expert] = round_no + 1 + wait

    def succeeded(self, expert: int) -> None:
        self.consecutive[expert] = 0
        self.skip_until[expert] = 0


class VirtualNetwork:
    """The simulated network for `LocalPool`: per-call delays and drops on a virtual clock.

    `deliver` decides, before any expert computes, which experts' answers would arrive in time under
    the same `Round` rule `RemotePool` uses; `clock_s` accumulates the virtual seconds spent waiting.
    """

    def __init__(
        self,
        cfg: NetworkConfig,
        policy: FaultPolicy,
        num_experts: int,
        layer: str = "layer",
        seed: int = 0,
    ):
        """`seed` is the run's; each link draws from `link_stream(seed, cfg, layer, expert)`."""
        self.policy = policy
        self.streams = [link_stream(seed, cfg, layer, e) for e in range(num_experts)]
        self.links = [Link(link_for(cfg, e), self.streams[e]) for e in range(num_experts)]
        self.memory = FailureMemory(num_experts, policy.backoff_base, policy.backoff_max)
        self.round_no = 0
        self.clock_s = 0.0
        self.last_waits_s: dict[int, float] = {}

    def move_expert(self, expert: int, spec: LinkSpec, host: str | None) -> None:
        """Expert `expert` now answers over `spec` (a market move): a fresh stream named by its host."""
        self.links[expert] = Link(spec, placed_stream(self.streams[expert], host))
        self.memory.succeeded(expert)

    def deliver(
        self,
        token_idx_A: torch.Tensor,
        sizes: list[int],
        num_tokens: int,
        row_bytes: int,
        reply_time_E: torch.Tensor | None = None,
    ) -> dict[int, str]:
        """Experts whose answer does not count this round, with the reason; advances the clock and
        leaves in `last_waits_s` how long the round waited for each asked expert (its arrival, or the
        deadline for a reply that did not come). `reply_time_E` drives an adaptive straggler cut-off."""
        self.round_no += 1
        failures = {
            e: "backoff" for e, size in enumerate(sizes) if size and self.memory.skipping(e, self.round_no)
        }
        asked = [e for e, size in enumerate(sizes) if size and e not in failures]
        arrivals = {e: self.links[e].sample(sizes[e] * row_bytes, sizes[e] * row_bytes) for e in asked}
        round_ = Round(
            token_idx_A, sizes, asked, num_tokens, self.policy, start=0.0, reply_time_E=reply_time_E
        )
        now = 0.0
        for e, arrival in sorted(
            ((e, t) for e, t in arrivals.items() if t is not None), key=lambda et: et[1]
        ):
            if arrival > round_.deadline:  # a reply at the deadline still counts
                break
            now = arrival
            round_.answer(e, now)
        expired = round_.expire()
        self.clock_s += round_.deadline if expired else now
        self.last_waits_s = {e: round_.deadline if e in expired else arrivals[e] for e in asked}
        failures |= expired
        for e in asked:
            if e in failures:
                self.memory.failed(e, self.round_no)
            else:
                self.memory.succeeded(e)
        return failures
