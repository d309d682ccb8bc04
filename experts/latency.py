"""Each expert's expected reply time, measured as the run goes, and the straggler cut-off that follows it.

`ReplyTimes` keeps one estimate per expert: an EMA of how long training calls waited for the expert's
reply (virtual arrival times in `LocalPool`'s simulated network, real send→reply times in `RemotePool`).
A reply that never came (dropped, cut as a straggler, timed out) counts as the time the round waited for
it, its deadline; as that is only a lower bound on the true reply time, it never lowers the estimate.
Routing (`market.latency_weight`) and the adaptive cut-off (`FaultPolicy.straggler_quantile`) read it.

Legend: E experts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch

from experts.errors import ConfigError


class ReplyTimes:
    """Expected reply time per expert, in seconds: `reply_time_E` (float64 [E]) is NaN until the expert's
    first measured training call, which sets it; every later one moves it by (1 - `ema`) of the gap."""

    def __init__(self, num_experts: int, ema: float):
        if not 0.0 <= ema < 1.0:
            raise ConfigError(f"latency_ema={ema} must be in [0, 1)")
        self.ema = ema
        self.reply_time_E = torch.full((num_experts,), math.nan, dtype=torch.float64)

    def observe(self, waited_s: dict[int, float], unanswered: Iterable[int] = ()) -> None:
        """Fold one round in: `waited_s[e]` is how long the round waited for expert e; experts in
        `unanswered` sent no reply by then, so their wait is a lower bound."""
        unanswered = set(unanswered)
        for e, seconds in waited_s.items():
            current = float(self.reply_time_E[e])
            if math.isnan(current):
                self.reply_time_E[e] = seconds
                continue
            if e in unanswered:
                seconds = max(seconds, current)
            # written as a step towards the sample, so a constant link's estimate stays exactly constant
            self.reply_time_E[e] = current + (1.0 - self.ema) * (seconds - current)

    def forget(self, expert: int) -> None:
        """Drop `expert`'s estimate (it moved to another host: its old link says nothing of the new one)."""
        self.reply_time_E[expert] = math.nan

    def state_dict(self) -> dict:
        return {"reply_time_E": self.reply_time_E.clone()}

    def load_state_dict(self, state: dict) -> None:
        saved = state["reply_time_E"]
        if saved.shape != self.reply_time_E.shape:
            raise ConfigError(
                f"reply_time_E of shape {tuple(saved.shape)}; this pool has {tuple(self.reply_time_E.shape)}"
            )
        self.reply_time_E = saved.to(torch.float64).clone()


def expected_wait_s(
    reply_time_E: torch.Tensor | None, asked: list[int], quantile: float | None
) -> float | None:
    """The adaptive straggler deadline, in seconds after the round's start: the `quantile` of the asked
    experts' expected reply times (those measured so far). None (use the fixed `straggler_cutoff`) when
    `quantile` is None or none of the asked experts has been measured yet."""
    if quantile is None or reply_time_E is None or not asked:
        return None
    known = reply_time_E[asked]
    known = known[~torch.isnan(known)]
    if known.numel() == 0:
        return None
    return float(torch.quantile(known, quantile))


class ReplyClock:
    """Real send→reply times of one remote round (monotonic seconds), for `ReplyTimes.observe`."""

    def __init__(self):
        self.sent_at: dict[int, float] = {}
        self.waited_s: dict[int, float] = {}
        self.unanswered: set[int] = set()

    def sent(self, expert: int) -> None:
        self.sent_at[expert] = time.monotonic()

    def replied(self, expert: int) -> None:
        """A reply (valid or not) arrived now."""
        self.waited_s[expert] = time.monotonic() - self.sent_at[expert]

    def failed(self, expert: int, reason: str) -> None:
        """The call failed: an ERROR reply came now, or (`reason` "dead") its worker died without one."""
        if reason == "dead":
            self.gave_up([expert])
        else:
            self.replied(expert)

    def gave_up(self, experts: Iterable[int], at: float | None = None) -> None:
        """No reply from `experts`: the round stopped waiting at monotonic time `at` (default: now)."""
        at = time.monotonic() if at is None else at
        for e in experts:
            if e in self.sent_at and e not in self.waited_s:
                self.waited_s[e] = max(at - self.sent_at[e], 0.0)
                self.unanswered.add(e)
