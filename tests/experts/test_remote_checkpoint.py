"""Checkpoints never lie: an expert whose worker cannot be reached at checkpoint time comes from that
worker's own last checkpoint, or is missing (None) and named; it is never stored at its initial weights."""

from __future__ import annotations

import time

import pytest
import torch

from tests.experts.test_remote import (
    EXPERTS_CFG,
    NUM_TOKENS,
    PAIRS,
    D,
    make_experts,
    process_transport,
    run_layer,
)

W1_EXPERTS = [1, 3]  # experts go to workers round-robin: w0 hosts 0 and 2, w1 hosts 1 and 3


def train_a_little(pool, steps: int) -> None:
    for step in range(steps):
        run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS, seed=step)
        pool.step(step)


def kill(transport, index: int) -> None:
    victim = transport.processes[index]
    victim.kill()
    victim.wait(timeout=10)
    deadline = time.monotonic() + 10
    while transport.coordinator.is_alive(f"w{index}") and time.monotonic() < deadline:
        transport.coordinator.drain()
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_an_unreachable_workers_experts_come_from_its_own_last_checkpoint(tmp_path):
    with process_transport(tmp_path) as transport:
        pool = transport.make_pool("layer", make_experts(), EXPERTS_CFG)
        train_a_little(pool, 2)
        checkpointed = pool.state_dict()  # w1 writes its own checkpoint too
        train_a_little(pool, 1)  # w1's experts move on past it
        kill(transport, 1)
        state = pool.state_dict()
    assert state["missing"] == []
    for e in W1_EXPERTS:
        for name, value in checkpointed["experts"][e].items():
            torch.testing.assert_close(state["experts"][e][name], value, atol=0, rtol=0)
        assert state["optimizers"][e]["state"]  # its optimizer state too, not a fresh one
    initial = make_experts()[1].state_dict()
    assert not torch.equal(state["experts"][1]["w_in.weight"], initial["w_in.weight"])


@pytest.mark.timeout(120)
def test_a_worker_that_never_checkpointed_leaves_its_experts_missing_not_reset(tmp_path):
    with process_transport(tmp_path) as transport:
        pool = transport.make_pool("layer", make_experts(), EXPERTS_CFG)
        train_a_little(pool, 2)
        kill(transport, 1)
        state = pool.state_dict()
    assert state["missing"] == W1_EXPERTS
    assert [state["experts"][e] is None for e in range(4)] == [False, True, False, True]
    assert [state["optimizers"][e] is None for e in range(4)] == [False, True, False, True]
