"""Where a remote MoE step's time goes, for benchmarks/transport.py: the CPU each process spends per step
(`CpuMeter`) with the least wall time those costs allow on this machine's cores, and the trainer's
timeline of one step (`StepTimeline`): its serial phases, when no worker can be computing.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from experts.remote import ProcessTransport


class CpuMeter:
    """CPU seconds per call of named steps: this process's (all its threads), and each worker's over the
    whole run (from /proc) per call of the step that used them (workers idle through the other steps)."""

    def __init__(self, transport: ProcessTransport):
        self.pids = [record.pid for record in transport.coordinator.workers.values() if record.pid]
        self.workers_before = [process_cpu_s(pid) for pid in self.pids]
        self.own_s: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def timed(self, name: str, threads: int, step):
        """`step` on `threads` torch threads, its CPU counted under `name`."""
        self.own_s[name], self.calls[name] = 0.0, 0

        def run() -> None:
            torch.set_num_threads(threads)
            tick = time.process_time()
            step()
            self.own_s[name] += time.process_time() - tick
            self.calls[name] += 1

        return run

    def per_call(self, name: str) -> float:
        return self.own_s[name] / self.calls[name]

    def workers_per_call(self, name: str) -> list[float | None]:
        after = [process_cpu_s(pid) for pid in self.pids]
        return [
            (a - b) / self.calls[name] if None not in (a, b) else None
            for b, a in zip(self.workers_before, after, strict=True)
        ]


def print_layer_cpu(local_s: float, threads: int, trainer_s: float, workers_s: list[float | None]) -> None:
    """CPU per step of both setups and the ratio of the least wall times those costs allow on this
    machine's cores (no waiting, perfect overlap). Local's CPU counts its threads' spin-waits, which a
    loaded machine inflates (a descheduled thread keeps the other spinning): there, the ratio flatters
    the process transport; the trainer's CPU is the figure the trunk's own work moves."""
    bound = process_step_bound(trainer_s, workers_s)
    if bound is None:
        print(UNREADABLE_WORKERS)
        return
    process_bound_s, cores = bound
    local_bound_s = local_s / min(threads, cores)
    worker_ms = " / ".join(f"{w * 1e3:.0f}" for w in workers_s)
    print(
        f"   CPU per step: local {local_s * 1e3:.0f} ms; process: trainer {trainer_s * 1e3:.1f} ms, workers"
        f" {worker_ms} ms → at best {local_bound_s * 1e3:.0f} vs {process_bound_s * 1e3:.0f} ms on {cores} cores:"
        f" process / local = {process_bound_s / local_bound_s:.3f} by CPU"
    )


UNREADABLE_WORKERS = "   CPU per step: the workers' CPU time is not readable here (/proc)"


def process_step_bound(trainer_s: float, workers_s: list[float | None]) -> tuple[float, int] | None:
    """(the least wall seconds a process step's CPU costs allow on the cores this process may use: no
    waiting, perfect overlap; those cores), or None where the workers' CPU time is not readable."""
    if not workers_s or None in workers_s:
        return None
    cores = usable_cores()
    return max(*workers_s, (trainer_s + sum(workers_s)) / cores), cores


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) of process `pid`, from /proc; None where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def print_cpu_bound(trainer_s: float, workers_s: list[float | None], floor_s: float) -> None:
    """CPU per step, which load from elsewhere inflates far less than wall time, and the fraction of
    the floor those CPU costs allow at best on this machine's cores (no waiting, perfect overlap)."""
    bound = process_step_bound(trainer_s, workers_s)
    if bound is None:
        print(UNREADABLE_WORKERS)
        return
    bound_s, cores = bound
    worker_ms = " / ".join(f"{w * 1e3:.1f}" for w in workers_s)
    print(
        f"   CPU per step: trainer {trainer_s * 1e3:.1f} ms, workers {worker_ms} ms, floor {floor_s * 1e3:.1f} ms"
        f" → on {cores} cores a step needs ≥ {bound_s * 1e3:.1f} ms: at best {100 * floor_s / bound_s:.0f} %"
        f" of the floor"
    )


class StepTimeline:
    """When the trainer sent each request and read each reply in a remote step (the coordinator's `send`
    and `receive`, wrapped while the timeline is open: `with StepTimeline(coordinator) as timeline`),
    summarised as the step's phases. Before the first forward request no worker has work, nor between
    the last forward reply and the first gradient sent: those phases are serial."""

    WRAPPED = ("send", "receive")

    def __init__(self, coordinator):
        self.events: list[tuple[str, float]] = []  # (sent or read message kind, perf_counter)
        self.phases: list[dict[str, float]] = []
        self.coordinator = coordinator

    def __enter__(self) -> StepTimeline:
        send, receive = self.coordinator.send, self.coordinator.receive

        def timed_send(name, message):
            self.events.append((f"sent {message.kind.name}", time.perf_counter()))
            return send(name, message)

        def timed_receive(timeout_s):
            replies = receive(timeout_s)
            now = time.perf_counter()
            self.events.extend((f"read {message.kind.name}", now) for _, message in replies)
            return replies

        self.coordinator.send, self.coordinator.receive = timed_send, timed_receive
        return self

    def __exit__(self, *exc_info) -> None:
        for name in self.WRAPPED:  # the instance attributes go: the class's methods show through again
            delattr(self.coordinator, name)

    def timed(self, step):
        """`step` with its phases recorded on each call."""

        def run() -> None:
            self.events.clear()
            start = time.perf_counter()
            step()
            self.phases.append(self.step_phases(start, time.perf_counter()))

        return run

    def step_phases(self, start: float, end: float) -> dict[str, float]:
        """Seconds of each phase; NaN for one whose messages the step did not have (no BACKWARD sent)."""

        def times(event: str) -> list[float]:
            return [at for name, at in self.events if name == event] or [math.nan]

        sent_forward, read_output, sent_backward = (
            times("sent FORWARD"),
            times("read OUTPUT"),
            times("sent BACKWARD"),
        )
        return {
            "before the first request": sent_forward[0] - start,
            "first to last forward reply": read_output[-1] - read_output[0],
            "last forward reply to the first gradient sent": sent_backward[0] - read_output[-1],
            "step": end - start,
        }

    def medians(self) -> dict[str, float]:
        """Each phase's median over the steps that had it (NaN where none did)."""
        medians = {}
        for name in self.phases[0] if self.phases else ():
            seconds = [p[name] for p in self.phases if math.isfinite(p[name])]
            medians[name] = statistics.median(seconds) if seconds else math.nan
        return medians

    def report(
        self, trainer_s: float, workers_s: list[float | None], threads: tuple[int, int], verdict
    ) -> None:
        """The phases' medians, and the least step their serial phases allow at these CPU costs, which
        `verdict(least_s)` puts against the step's reference. `threads`: (the trainer's, each worker's).
        While only the trainer works, the cores its threads leave idle, and the slowest worker waits
        through them; a worker's CPU takes at least CPU / threads of wall time."""
        medians = self.medians()
        phases = ", ".join(
            f"{name} {seconds * 1e3:.1f} ms" for name, seconds in medians.items() if name != "step"
        )
        print(f"   the trainer's timeline of a step (medians): {phases or 'no steps timed'}")
        serial_s = medians.get("before the first request", math.nan) + medians.get(
            "last forward reply to the first gradient sent", math.nan
        )
        if not workers_s or None in workers_s or not math.isfinite(serial_s):
            return
        cores, (trainer_threads, worker_threads) = usable_cores(), threads
        idle_cores = max(0, cores - trainer_threads)
        least_s = max(
            serial_s + max(workers_s) / worker_threads,
            (trainer_s + sum(workers_s) + idle_cores * serial_s) / cores,
        )
        print(
            f"   with its serial phases ({serial_s * 1e3:.1f} ms, {idle_cores} of {cores} cores idle) a step needs"
            f" ≥ {least_s * 1e3:.1f} ms at these CPU costs: {verdict(least_s)}"
        )
