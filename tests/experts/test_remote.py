"""transport=process: remote experts equal local ones, and faults cost what the policy says.

Every test that starts workers does so through `process_transport`, which tears every process down
(also on failure) and checks none is left; every test has a hard timeout.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import zmq

from experts.behaviours import parse_behaviours
from experts.modules import FFN, ExpertsConfig
from experts.network import FailureMemory, FaultPolicy, LinkSpec, NetworkConfig, Round, VirtualNetwork
from experts.pool import LocalPool, all_finite, invalid_outputs
from experts.remote import ProcessTransport, ProcessTransportConfig
from experts.remote.call import Answers
from experts.remote.wire import HEADER, Kind, Message, encode
from moe.errors import ConfigError
from moe.nn.layer import combine
from router.plan import build_plan
from tests.helpers import REPO

D, F_HIDDEN, E = 8, 16, 4
EXPERTS_CFG = ExpertsConfig(num=E, d_ff=F_HIDDEN, lr=1e-2, grad_clip=1.0)
FAST = {"heartbeat_interval": 0.2, "heartbeat_misses": 25, "forward_timeout": 20.0, "backward_timeout": 20.0}


# --- helpers -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def process_transport(run_dir: Path, **overrides):
    """A ProcessTransport whose workers (and any worker a test starts by hand) are always stopped."""
    cfg = ProcessTransportConfig(**{**FAST, **overrides})
    transport = ProcessTransport(cfg, device=torch.device("cpu"), run_dir=run_dir, seed=0)
    transport.hand_started = []
    try:
        yield transport
    finally:
        transport.close()
        for process in transport.hand_started:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(timeout=10)
        assert all(p.poll() is not None for p in transport.processes + transport.hand_started)


def python_path() -> str:
    """The repo first, then whatever path this interpreter was started with."""
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def start_worker_by_hand(transport, name: str, state_dir: Path | None = None) -> subprocess.Popen:
    process = hand_worker(transport.coordinator.connect_address, name, state_dir)
    transport.hand_started.append(process)
    return process


def hand_worker(coordinator: str, name: str, state_dir: Path | None = None) -> subprocess.Popen:
    """`python -m experts.worker` as a person would start it, joining `coordinator` (no CURVE)."""
    env = {**os.environ, "PYTHONPATH": python_path()}
    command = [
        sys.executable,
        "-m",
        "experts.worker",
        "--coordinator",
        coordinator,
        "--name",
        name,
        "--log-level",
        "WARNING",
        *(["--state-dir", str(state_dir)] if state_dir is not None else []),
    ]
    return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)


def make_experts(seed: int = 0) -> list[FFN]:
    torch.manual_seed(seed)
    return [FFN(D, F_HIDDEN) for _ in range(E)]


def plan_of(pairs: list[tuple[int, int]], num_tokens: int, seed: int = 0):
    """A plan routing (token, expert) pairs, and the leaf its gates come from."""
    generator = torch.Generator().manual_seed(seed)
    token_idx = torch.tensor([t for t, _ in pairs])
    expert_idx = torch.tensor([e for _, e in pairs])
    gate_leaf = torch.rand(len(pairs), generator=generator).requires_grad_()
    return build_plan(token_idx, expert_idx, gate_leaf * 1.0, num_tokens=num_tokens, num_experts=E), gate_leaf


def run_layer(pool, x_ND: torch.Tensor, pairs, seed: int = 0, step: int = 0):
    """pool → combine → a fixed loss → backward at training step `step`; returns what must agree between pools."""
    plan, gate_leaf = plan_of(pairs, x_ND.shape[0], seed)
    x_ND = x_ND.detach().clone().requires_grad_()
    pooled = pool(x_ND[plan.token_idx], plan, step)
    out_ND, _ = combine(pooled.y_AD, plan, pooled.answered_E)
    weights_ND = torch.linspace(-1, 1, out_ND.numel()).reshape(out_ND.shape)
    (out_ND * weights_ND).sum().backward()
    return out_ND.detach(), x_ND.grad, gate_leaf.grad, pooled.answered_E


def nan_state(pool_state: dict, expert: int) -> dict:
    state = copy.deepcopy(pool_state)
    state["experts"][expert] = {
        k: torch.full_like(v, float("nan")) for k, v in state["experts"][expert].items()
    }
    return state


# token 5 has no expert, expert 3 gets no token; every token has an expert on w0 (experts 0 and 2)
PAIRS = [(0, 0), (0, 1), (1, 1), (1, 2), (2, 0), (3, 2), (3, 1), (4, 0), (6, 2), (7, 0), (7, 1)]
NUM_TOKENS = 8


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    with process_transport(tmp_path_factory.mktemp("shared")) as transport:
        yield transport


# --- equivalence -------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_remote_equals_local_with_a_missing_expert_and_a_token_without_experts(shared):
    experts = make_experts()
    local = LocalPool(copy.deepcopy(experts), EXPERTS_CFG, policy=shared.cfg)  # the same fault policy
    remote = shared.make_pool("equivalence", experts, EXPERTS_CFG)
    missing = 2  # NaN weights: both pools must reject its output and renormalise its tokens' gates
    for pool in (local, remote):
        pool.load_state_dict(nan_state(local.state_dict(), missing))
    for step in range(3):
        x_ND = torch.randn(NUM_TOKENS, D)
        got_local = run_layer(local, x_ND, PAIRS, seed=step)
        got_remote = run_layer(remote, x_ND, PAIRS, seed=step)
        for a, b in zip(got_local, got_remote, strict=True):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        assert got_remote[3].tolist() == [True, True, False, True]
        assert torch.isfinite(got_remote[0]).all()
        assert got_remote[0][5].abs().sum() == 0
        assert remote.last_failures[missing] in (
            "invalid: non-finite or norm above max_output_norm",
            "backoff",
        )
        local.step(0)
        remote.step(0)
    remote_state, local_state = remote.state_dict(), local.state_dict()
    for e in (0, 1, 3):
        for name, value in local_state["experts"][e].items():
            torch.testing.assert_close(remote_state["experts"][e][name], value, atol=1e-6, rtol=0)
    assert remote.failure_counts[(missing, "invalid: non-finite or norm above max_output_norm")] >= 1


@pytest.mark.timeout(60)
def test_evaluation_calls_need_no_backward_and_match_local(shared):
    experts = make_experts(seed=1)
    local = LocalPool(copy.deepcopy(experts))
    remote = shared.make_pool("eval", experts, EXPERTS_CFG)
    plan, _ = plan_of(PAIRS, NUM_TOKENS)
    x_ND = torch.randn(NUM_TOKENS, D)
    with torch.no_grad():
        y_local, y_remote = local(x_ND[plan.token_idx], plan).y_AD, remote(x_ND[plan.token_idx], plan).y_AD
    torch.testing.assert_close(y_remote, y_local, atol=1e-6, rtol=0)


def input_only_then_train(pool, x_ND: torch.Tensor, pairs, seed: int):
    """pool → combine; two input-gradient-only backwards (as PoI takes) with their own grad_out, then
    the training backward of `run_layer`'s loss and a step. Returns what must agree between pools."""
    plan, gate_leaf = plan_of(pairs, x_ND.shape[0], seed)
    x_ND = x_ND.detach().clone().requires_grad_()
    pooled = pool(x_ND[plan.token_idx], plan)
    out_ND, _ = combine(pooled.y_AD, plan, pooled.answered_E)
    extra_ND = torch.randn(out_ND.shape, generator=torch.Generator().manual_seed(100 + seed))
    with pool.only_input_gradients():
        (extra_grad_ND,) = torch.autograd.grad((out_ND * extra_ND).sum(), x_ND, retain_graph=True)
        (again_ND,) = torch.autograd.grad((out_ND * extra_ND).sum(), x_ND, retain_graph=True)
    torch.testing.assert_close(again_ND, extra_grad_ND, atol=0, rtol=0)  # the forward was kept
    assert x_ND.grad is None
    assert gate_leaf.grad is None
    weights_ND = torch.linspace(-1, 1, out_ND.numel()).reshape(out_ND.shape)
    (out_ND * weights_ND).sum().backward()
    pool.step(0)
    return extra_grad_ND, x_ND.grad, gate_leaf.grad


@pytest.mark.timeout(60)
def test_an_input_only_backward_returns_local_input_gradients_and_leaves_the_owners_be(shared):
    experts = make_experts(seed=3)
    local = LocalPool(copy.deepcopy(experts), EXPERTS_CFG)
    plain = LocalPool(copy.deepcopy(experts), EXPERTS_CFG)
    remote = shared.make_pool("input-only", experts, EXPERTS_CFG)
    assert remote.repeatable_backward
    for step in range(3):
        x_ND = torch.randn(NUM_TOKENS, D)
        got_local = input_only_then_train(local, x_ND, PAIRS, seed=step)
        got_remote = input_only_then_train(remote, x_ND, PAIRS, seed=step)
        assert not any(reason.startswith("backward") for reason in remote.last_failures.values())
        for a, b in zip(got_local, got_remote, strict=True):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        assert got_remote[0].abs().sum() > 0
        got_plain = run_layer(plain, x_ND, PAIRS, seed=step)  # no extra pass at all
        torch.testing.assert_close(got_remote[1], got_plain[1], atol=1e-5, rtol=0)
        plain.step(0)
    # parameters after the training steps: as if the input-only passes never happened
    remote_state, plain_state = remote.state_dict(), plain.state_dict()
    for e in range(E):
        for name, value in plain_state["experts"][e].items():
            torch.testing.assert_close(remote_state["experts"][e][name], value, atol=1e-6, rtol=0)
    assert not remote.failure_counts


@pytest.mark.timeout(60)
def test_behaviours_answer_the_same_in_workers_as_in_process(shared):
    behaviours = parse_behaviours({0: "noisy:0.5", 1: "lazy", 2: "crash:1", 3: "adversarial:2"}, E)
    experts = make_experts(seed=4)
    local = LocalPool(copy.deepcopy(experts), EXPERTS_CFG)
    remote = shared.make_pool("behaviours", experts, EXPERTS_CFG)
    pairs = [*PAIRS, (5, 3)]
    for pool in (local, remote):
        pool.set_behaviours(behaviours, seed=7, layer="behaviours")
    for step in range(3):
        x_ND = torch.randn(NUM_TOKENS, D)
        got_local, got_remote = (
            run_layer(local, x_ND, pairs, seed=step, step=step),
            run_layer(remote, x_ND, pairs, seed=step, step=step),
        )
        for a, b in zip(got_local, got_remote, strict=True):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        assert (2 in remote.last_failures) == (step >= 1)
        local.step(step)
        remote.step(step)


@pytest.mark.timeout(60)
def test_remote_equals_local_under_bf16_autocast_with_a_lazy_and_a_crashed_expert(shared):
    """Workers compute in the precision the call is made in, in the same row buckets, and every pool
    answers in the autocast dtype whoever answered (a lazy expert's zeros, a failed expert's)."""
    behaviours = parse_behaviours({1: "lazy", 3: "crash:0"}, E)
    experts = make_experts(seed=5)
    local = LocalPool(copy.deepcopy(experts), EXPERTS_CFG)
    remote = shared.make_pool("bf16", experts, EXPERTS_CFG)
    for pool in (local, remote):
        pool.set_behaviours(behaviours, seed=7, layer="bf16")
    pairs = [*PAIRS, (5, 3)]
    for step in range(3):
        x_ND = torch.randn(NUM_TOKENS, D)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_local = run_layer(local, x_ND, pairs, seed=step, step=step)
            got_remote = run_layer(remote, x_ND, pairs, seed=step, step=step)
        assert got_local[0].dtype == got_remote[0].dtype == torch.bfloat16
        for a, b in zip(got_local, got_remote, strict=True):
            torch.testing.assert_close(b, a, atol=0, rtol=0)
        assert set(remote.last_failures) == set(local.last_failures) == {3}  # remote: crashed, then backoff
        local.step(step)
        remote.step(step)
    remote_state, local_state = remote.state_dict(), local.state_dict()
    for e in range(E):
        for name, value in local_state["experts"][e].items():
            torch.testing.assert_close(remote_state["experts"][e][name], value, atol=0, rtol=0)


# --- robustness --------------------------------------------------------------------------------------


def bad_requests(layer: int) -> list[list]:
    """Requests only a broken or hostile coordinator would send; call ids far from the pool's own."""
    call = 10_000
    forward = encode(Message(Kind.FORWARD, call, layer, 0, meta={"keep": True}, tensors=[torch.randn(3, D)]))
    return [
        [b"garbage"],
        [b"x" * HEADER.size, b"{}"],
        [*forward[:3], bytes(forward[3])[:-8]],  # truncated payload
        encode(Message(Kind.FORWARD, call, layer, 99, tensors=[torch.randn(3, D)])),  # unknown expert
        encode(Message(Kind.FORWARD, call, 77, 0, tensors=[torch.randn(3, D)])),  # unknown layer
        encode(Message(Kind.FORWARD, call, layer, 0, tensors=[torch.randn(3, D + 1)])),  # wrong width
        encode(Message(Kind.FORWARD, call, layer, 0, tensors=[torch.ones(3, D, dtype=torch.int64)])),
        encode(Message(Kind.FORWARD, call, layer, 0, tensors=[])),
        encode(Message(Kind.BACKWARD, call, layer, 0, tensors=[torch.randn(3, D)])),  # never forwarded
        encode(Message(Kind.FORWARD, call, layer, 0, meta={"autocast": "int8"}, tensors=[torch.randn(3, D)])),
        encode(Message(Kind.HELLO, meta={"name": "impostor"})),  # a kind workers do not accept
        encode(
            Message(Kind.LOAD_STATE, call, layer, 0, meta={"names": ["param.nope"]}, tensors=[torch.ones(1)])
        ),
    ]


@pytest.mark.timeout(60)
def test_a_worker_survives_malformed_frames_and_bad_requests_and_keeps_answering(shared):
    experts = make_experts(seed=2)
    local = LocalPool(copy.deepcopy(experts), EXPERTS_CFG)
    remote = shared.make_pool("robust", experts, EXPERTS_CFG)
    coordinator = shared.coordinator
    identity = coordinator.workers["w0"].identity
    errors_before = coordinator.stray["ERROR"]
    requests = bad_requests(remote.layer)
    for frames in requests:
        coordinator.socket.send_multipart([identity, *frames])
    x_ND = torch.randn(NUM_TOKENS, D)
    for a, b in zip(run_layer(local, x_ND, PAIRS), run_layer(remote, x_ND, PAIRS), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        coordinator.stray["ERROR"] - errors_before < len(requests)
        or coordinator.workers["w0"].stats["errors"] < 9
    ):
        coordinator.drain()  # heartbeats bring the worker's own counters
        time.sleep(0.05)
    assert coordinator.stray["ERROR"] - errors_before == len(requests)  # one ERROR answer per bad request
    assert coordinator.workers["w0"].stats["rejected"] == 3  # frames it could not even parse
    assert coordinator.workers["w0"].stats["errors"] == 9  # well-formed requests it could not serve
    assert shared.processes[0].poll() is None


@pytest.mark.timeout(60)
def test_the_coordinator_survives_garbage_and_strangers(shared):
    coordinator = shared.coordinator
    rejected_before = sum(coordinator.rejected.values())
    context = zmq.Context.instance()
    stranger = context.socket(zmq.DEALER)
    stranger.setsockopt(zmq.LINGER, 0)
    stranger.connect(coordinator.connect_address)
    try:
        stranger.send_multipart([b"\x00" * 7, b"junk"])
        stranger.send_multipart(encode(Message(Kind.OUTPUT, 1, 0, 0, tensors=[torch.ones(2, D)])))
        deadline = time.monotonic() + 5
        while not stranger.poll(50) and time.monotonic() < deadline:
            coordinator.drain()
        reply = stranger.recv_multipart()
        assert Kind(HEADER.unpack(reply[0])[2]) == Kind.REGISTER_AGAIN  # unknown peers are asked to register
    finally:
        stranger.close()
    assert sum(coordinator.rejected.values()) == rejected_before + 1
    experts = make_experts(seed=3)
    remote = shared.make_pool("after-garbage", experts, EXPERTS_CFG)
    assert run_layer(remote, torch.randn(NUM_TOKENS, D), PAIRS)[3].all()


def test_outputs_of_the_wrong_shape_or_dtype_or_size_are_rejected():
    x_slices = [torch.ones(2, D)] * 5
    y_slices = [
        torch.ones(2, D),
        torch.ones(3, D),
        torch.ones(2, D, dtype=torch.float64),
        torch.full((2, D), float("inf")),
        torch.full((2, D), 1e6),
        torch.ones(2, D).index_fill_(1, torch.tensor([3]), float("nan")),
        torch.ones(2, D).index_fill_(1, torch.tensor([0]), -float("inf")),
    ]
    x_slices = [torch.ones(2, D)] * len(y_slices)
    assert sorted(invalid_outputs(y_slices, x_slices, max_norm=1e4)) == [1, 2, 3, 4, 5, 6]
    assert sorted(invalid_outputs(y_slices, x_slices, max_norm=0)) == [1, 2, 3, 5, 6]


def test_answers_gather_in_slice_order_whatever_the_arrival_cast_with_zeros_where_none_came():
    slices = [torch.ones(2, D), torch.ones(0, D), torch.ones(3, D), torch.ones(1, D)]
    answers = {3: torch.randn(1, D, dtype=torch.float64), 0: torch.randn(2, D)}  # in arrival order
    gathered = Answers(slices, torch.float32)
    for e, answer in answers.items():
        gathered.put(e, answer)
    expected = torch.cat([answers[0], torch.zeros(0, D), torch.zeros(3, D), answers[3].float()])
    assert gathered.given == {0, 3}
    assert torch.equal(gathered.gathered(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_all_finite_agrees_with_the_elementwise_check_for_one_bad_value_anywhere(dtype):
    generator = torch.Generator().manual_seed(0)
    for bad in (float("nan"), float("inf"), -float("inf"), 3e38 if dtype != torch.bfloat16 else 1e38):
        for _ in range(20):
            t_RC = torch.randn(7, 5, generator=generator).to(dtype)
            t_RC.view(-1)[int(torch.randint(35, (1,), generator=generator))] = bad
            assert bool(all_finite(t_RC)) == bool(torch.isfinite(t_RC).all())
    assert bool(all_finite(torch.empty(0, D)))


# --- faults ------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_frozen_worker_costs_the_straggler_cutoff_not_the_timeout(tmp_path):
    cutoff = 0.3
    with process_transport(tmp_path, straggler_cutoff=cutoff, forward_timeout=20.0) as transport:
        pool = transport.make_pool("straggler", make_experts(), EXPERTS_CFG)
        frozen = transport.processes[1]  # hosts experts 1 and 3
        run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS)
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            tick = time.monotonic()
            out_ND, _, _, answered_E = run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS)
            elapsed = time.monotonic() - tick
            assert cutoff <= elapsed < cutoff + 2.0, elapsed
            assert answered_E.tolist() == [True, False, True, True]
            assert pool.last_failures == {1: "straggler"}
            assert torch.isfinite(out_ND).all()
            tick = time.monotonic()
            run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS)  # expert 1 now backs off: no waiting at all
            assert time.monotonic() - tick < cutoff
            assert pool.last_failures == {1: "backoff"}
        finally:
            os.kill(frozen.pid, signal.SIGCONT)


@pytest.mark.timeout(90)
def test_a_killed_worker_fails_its_experts_and_rejoins_from_its_checkpoint(tmp_path):
    with process_transport(tmp_path) as transport:
        pool = transport.make_pool("chaos", make_experts(), EXPERTS_CFG)
        for step in range(2):
            run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS, seed=step)
            pool.step(0)
        checkpointed = pool.state_dict()  # the owners also write their own checkpoints
        assert (tmp_path / "workers" / "w1" / "experts.safetensors").exists()
        run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS)
        pool.step(0)  # w1's experts move past their checkpoint

        victim = transport.processes[1]
        victim.kill()
        victim.wait(timeout=10)
        tick = time.monotonic()
        out_ND, x_grad, _, answered_E = run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS)
        pool.step(0)
        assert time.monotonic() - tick < 2.0
        assert answered_E.tolist() == [True, False, True, True]
        assert pool.last_failures == {1: "dead"}
        assert torch.isfinite(out_ND).all()
        assert torch.isfinite(x_grad).all()

        start_worker_by_hand(transport, "w1", state_dir=tmp_path / "workers" / "w1")  # where it was spawned
        coordinator = transport.coordinator
        deadline = time.monotonic() + 30
        while not coordinator.is_alive("w1") and time.monotonic() < deadline:
            coordinator.drain()
            time.sleep(0.05)
        assert coordinator.is_alive("w1")
        answered_E = run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS)[3]
        assert answered_E.all()
        assert pool.last_failures == {}
        rejoined = pool.state_dict()
        for name, value in checkpointed["experts"][1].items():
            torch.testing.assert_close(rejoined["experts"][1][name], value, atol=0, rtol=0)


LIFECYCLE_CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from experts.remote import ProcessTransport, ProcessTransportConfig
    transport = ProcessTransport(ProcessTransportConfig(workers=2), device=torch.device("cpu"), run_dir=None, seed=0)
    try:
        print(" ".join(str(p.pid) for p in transport.processes), flush=True)
        time.sleep(120)
    finally:
        transport.close()
    """
)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_gone(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(_gone(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the workers")
@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["sigkill-trainer", "ctrl-c"])
def test_workers_never_outlive_the_trainer(how):
    trainer = subprocess.Popen(
        [sys.executable, "-c", LIFECYCLE_CHILD],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": python_path()},
        start_new_session=True,
    )
    pids: list[int] = []
    try:
        pids = [int(pid) for pid in trainer.stdout.readline().split()]
        assert len(pids) == 2
        tick = time.monotonic()
        if how == "sigkill-trainer":
            trainer.kill()
        else:
            os.killpg(trainer.pid, signal.SIGINT)  # what a terminal sends the whole foreground group
        assert _wait_gone(pids, 10), "workers outlived their trainer"
        assert time.monotonic() - tick < 5
        assert trainer.wait(timeout=10) is not None
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            trainer.kill()
        trainer.wait(timeout=10)


# --- the fault rules, without processes --------------------------------------------------------------


def test_the_round_cuts_stragglers_once_every_token_has_k_min_answers():
    plan, _ = plan_of(PAIRS, NUM_TOKENS)
    sizes = plan.split_sizes()
    policy = FaultPolicy(forward_timeout=10.0, k_min=1, straggler_cutoff=0.5)
    round_ = Round(plan.token_idx, sizes, [0, 1, 2], NUM_TOKENS, policy, start=0.0)
    round_.answer(1, now=1.0)
    assert round_.deadline == 10.0  # tokens 2, 4 and 6 have no answer yet
    round_.answer(0, now=2.0)
    assert round_.deadline == 10.0  # token 6 only has expert 2
    round_.fail(2, now=3.0)  # failed: token 6 can have no more answers, so k_min is met for all
    assert round_.deadline == 3.5
    assert round_.expire() == {}  # every asked expert answered or failed: nothing left to wait for


def test_the_round_times_out_when_k_min_is_never_met():
    plan, _ = plan_of(PAIRS, NUM_TOKENS)
    round_ = Round(plan.token_idx, plan.split_sizes(), [0, 1, 2], NUM_TOKENS, FaultPolicy(k_min=2), start=0.0)
    round_.answer(0, now=0.1)
    assert round_.deadline == 10.0  # forward_timeout: k_min is not met, so no cut-off shortens it
    assert round_.expire() == {1: "timeout", 2: "timeout"}


def test_failure_memory_backs_off_exponentially_up_to_the_cap():
    memory = FailureMemory(1, base=1, cap=4)
    asked = []
    for round_no in range(1, 25):
        if not memory.skipping(0, round_no):
            asked.append(round_no)
            memory.failed(0, round_no)
    assert asked == [1, 3, 6, 11, 16, 21]  # sits out 1, 2, 4, then 4 (the cap) calls
    memory.succeeded(0)
    assert not memory.skipping(0, 25)


def test_the_virtual_network_is_deterministic_and_never_sleeps():
    network = NetworkConfig(
        default=LinkSpec(latency_ms=5.0, jitter_ms=2.0, distribution="lognormal"),
        experts={1: {"latency_ms": 100_000.0}, 2: {"drop_prob": 0.5}},
    )
    policy = FaultPolicy(forward_timeout=10.0, straggler_cutoff=0.05, backoff_base=0)
    outcomes = []
    for _ in range(2):
        experts = make_experts()
        pool = LocalPool(experts, policy=policy, network=VirtualNetwork(network, policy, E, layer="l0"))
        tick = time.monotonic()
        failures = []
        for step in range(10):
            run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS, seed=step)
            failures.append(dict(pool.last_failures))
        assert time.monotonic() - tick < 5.0  # 100 s of virtual latency cost no real time
        outcomes.append((failures, pool.network.clock_s))
    assert outcomes[0] == outcomes[1]
    failures, clock_s = outcomes[0]
    assert all(f.get(1) in ("straggler", "timeout") for f in failures)
    assert any(2 in f for f in failures)
    assert not all(2 in f for f in failures)
    assert clock_s > 0.05 * 10


# --- end to end: train(cfg) ----------------------------------------------------------------------------


def train_losses(run_dir: Path) -> list[float]:
    from moe.engine.metrics import read_metrics

    return [event["train/loss"] for event in read_metrics(run_dir) if "train/loss" in event]


TRAIN_TINY = [
    "debug=default",
    "data=clusters",
    "trainer.log_every=1",
    "trainer.threads=1",
    "transport.threads=1",
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("precision", "steps"), [("fp32", 50), ("bf16", 20)])
def test_training_with_process_transport_follows_the_local_trajectory(tmp_path, precision, steps):
    """…in either precision: under bf16 the workers compute under the autocast the trainer's own
    experts would (`autocast_meta`), in the same row buckets."""
    from moe.engine.loop import train
    from tests.helpers import compose

    common = [
        *TRAIN_TINY,
        f"trainer.precision={precision}",
        f"trainer.max_steps={steps}",
        f"trainer.eval_every={steps}",
        f"trainer.ckpt_every={steps}",
    ]
    for transport in ("local", "process"):
        overrides = [*common, f"transport={transport}", f"run_dir={tmp_path / transport}"]
        if transport == "local":
            overrides.remove("transport.threads=1")
        train(compose(overrides))
    local, remote = train_losses(tmp_path / "local"), train_losses(tmp_path / "process")
    assert len(local) == len(remote) == steps
    assert max(abs(a - b) for a, b in zip(local, remote, strict=True)) < 1e-5


def _pid_in_log(log_path: Path, deadline: float) -> int:
    while time.monotonic() < deadline:
        if log_path.exists():
            for line in log_path.read_text().splitlines():
                if " (pid " in line:
                    return int(line.split(" (pid ")[1].split(")")[0])
        time.sleep(0.05)
    raise AssertionError(f"no pid in {log_path}")


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    return max((int(json.loads(line)["step"]) for line in lines if line.strip()), default=0)


@pytest.mark.timeout(240)
def test_sigkill_of_a_worker_mid_run_still_finishes_cleanly(tmp_path):
    """…and the final checkpoint, taken without w1 (which never checkpointed itself), is marked
    incomplete: resume refuses it naming w1's experts, unless resume_incomplete=true."""
    from moe.engine.checkpoint import load_checkpoint
    from moe.engine.loop import train
    from moe.errors import CheckpointError
    from tests.helpers import compose

    run_dir = tmp_path / "run"
    steps = 60
    command = [
        sys.executable,
        "train.py",
        *TRAIN_TINY,
        "transport=process",
        f"trainer.max_steps={steps}",
        f"trainer.eval_every={steps}",
        f"trainer.ckpt_every={steps}",
        f"run_dir={run_dir}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    trainer = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": python_path()},
    )
    worker_pids: list[int] = []
    try:
        deadline = time.monotonic() + 90
        worker_pids = [
            _pid_in_log(run_dir / "workers" / name / "worker.log", deadline) for name in ("w0", "w1")
        ]
        while _last_step(run_dir) < 5 and trainer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert trainer.poll() is None, "the run ended before the worker could be killed"
        killed_at = _last_step(run_dir)
        os.kill(worker_pids[1], signal.SIGKILL)
        output, _ = trainer.communicate(timeout=120)
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait(timeout=10)
        for pid in worker_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert trainer.returncode == 0, output[-3000:]
    assert "worker w1 is dead" in output
    assert killed_at < steps
    losses = train_losses(run_dir)
    assert len(losses) == steps
    assert all(map(math.isfinite, losses))
    after = losses[killed_at:]
    assert sum(after[-10:]) / 10 < sum(after[:5]) / 5  # still learning without w1's experts
    assert _wait_gone(worker_pids, 10)

    _, state = load_checkpoint(run_dir)
    missing = state["incomplete"]
    assert missing
    assert all(experts for experts in missing.values())
    for layer, experts in missing.items():
        assert all(state["pools"][layer]["experts"][e] is None for e in experts)
    resume = [*TRAIN_TINY, "transport=process", f"resume={run_dir}", f"trainer.max_steps={steps + 2}"]
    layer, experts = next(iter(missing.items()))
    with pytest.raises(CheckpointError, match=rf"incomplete: .*{layer}: experts \{experts}"):
        train(compose(resume))
    train(compose([*resume, "resume_incomplete=true"]))
    assert len(train_losses(run_dir)) == steps + 2


def test_the_local_transport_simulates_the_configured_network_in_virtual_time():
    from experts.transport import open_transport
    from tests.helpers import compose

    def pool_for(*overrides: str):
        cfg = compose(["transport=local", *overrides])
        transport = open_transport(cfg.transport, device=torch.device("cpu"), run_dir=None, seed=0)
        return transport.make_pool("layer0", make_experts(), EXPERTS_CFG)

    assert pool_for().network is None  # the default ideal network costs nothing
    pool = pool_for("transport.network.experts={1: {drop_prob: 1.0}}", "transport.straggler_cutoff=0.01")
    run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS)
    assert pool.last_failures == {1: "straggler"}
    with pytest.raises(ConfigError, match="latncy_ms"):
        pool_for("transport.network.experts={1: {latncy_ms: 5}}")


def test_a_transport_gets_its_config_typed_and_the_config_is_its_fault_policy():
    from omegaconf import OmegaConf

    from experts.transport import LocalTransportConfig, open_transport
    from tests.helpers import compose

    def opened(node):
        return open_transport(node, device=torch.device("cpu"), run_dir=None, seed=0)

    cfg = opened(compose(["transport=local", "transport.k_min=2", "transport.backoff_max=8"]).transport).cfg
    assert type(cfg) is LocalTransportConfig
    assert isinstance(cfg, FaultPolicy)
    assert (cfg.k_min, cfg.backoff_max, cfg.forward_timeout) == (2, 8, FaultPolicy().forward_timeout)
    with pytest.raises(ConfigError, match=r"transport\.k_min"):
        opened(OmegaConf.create({"name": "local", "k_min": "many"}))
    with pytest.raises(ConfigError, match="k_min=-1"):
        opened(OmegaConf.create({"name": "local", "k_min": -1}))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_resume_with_process_transport_continues_the_uninterrupted_trajectory(tmp_path):
    # every worker's experts and optimizer state must travel through the trainer's checkpoint
    from moe.engine.loop import train
    from tests.helpers import compose

    common = [
        *TRAIN_TINY,
        "transport=process",
        "trainer.max_steps=8",
        "trainer.ckpt_every=4",
        "trainer.eval_every=8",
    ]
    train(compose([*common, f"run_dir={tmp_path / 'straight'}"]))
    train(compose([*common, f"run_dir={tmp_path / 'interrupted'}"]))
    (tmp_path / "interrupted" / "checkpoints" / "step_0000008.pt").unlink()
    train(compose([*common, f"resume={tmp_path / 'interrupted'}"]))
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "interrupted")
    assert len(resumed) == len(straight) == 8
    assert max(abs(a - b) for a, b in zip(straight, resumed, strict=True)) < 1e-6


@pytest.mark.timeout(180)
def test_taylor_scores_layers_under_a_remote_pool_as_under_a_local_one(tmp_path, caplog):
    """The curvature backward and fresh views pass through the remote pool above layer0 (input
    gradients only), so nothing is skipped and layer0's scores match `transport=local`."""
    import logging

    from moe.engine.loop import train
    from tests.helpers import compose

    steps = 4
    common = [
        "debug=default",
        "model.n_layers=2",
        "poi=taylor",
        "poi.curvature_every=1",  # the curvature backward every step, through the pool above layer0
        "trainer.threads=1",
        f"trainer.max_steps={steps}",
        f"trainer.eval_every={steps}",
        f"trainer.ckpt_every={steps}",
    ]
    summaries = {}
    for transport in ("local", "process"):
        overrides = [*common, f"transport={transport}", f"run_dir={tmp_path / transport}"]
        if transport == "process":
            overrides.append("transport.threads=1")
        with caplog.at_level(logging.WARNING, logger="moe.incentives.poi.scorer"):
            summaries[transport] = train(compose(overrides))
    assert summaries["process"]["poi/scorer"] == "taylor"
    assert "repeatable_backward" not in caplog.text
    local, remote = summaries["local"], summaries["process"]
    keys = [k for k in local if k.startswith("poi/score/layer0/")]
    assert len(keys) == 4
    for key in keys:
        assert remote[key] == pytest.approx(local[key], abs=1e-4, rel=1e-4), key
