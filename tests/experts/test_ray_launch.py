"""`transport.launch=ray` on a two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`):
one worker actor per node trains exactly as `launch=local` does; a killed actor is restarted by Ray
and rejoins from its own checkpoint; no Ray process outlives a run, an embedded Ray or the cluster.

Ray starts slowly on few cores, so the module shares one cluster; every test has a hard timeout.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

ray = pytest.importorskip("ray", reason="transport.launch=ray needs the ray extra: pip install -e '.[ray]'")

from ray.cluster_utils import Cluster  # noqa: E402

from tests.experts.test_remote import (  # noqa: E402
    EXPERTS_CFG,
    NUM_TOKENS,
    PAIRS,
    TRAIN_TINY,
    D,
    _last_step,
    make_experts,
    process_transport,
    python_path,
    run_layer,
    train_losses,
)
from tests.helpers import REPO, compose  # noqa: E402

NODE = {"num_cpus": 1, "object_store_memory": 100 * 2**20}  # one worker actor fits on each node


def descendants() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def wait_gone(pids: set[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [
            p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        ]
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node, one CPU each; on teardown every process they started must be gone."""
    before = descendants()
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    try:
        cluster.add_node(**NODE)
        cluster.wait_for_nodes(timeout=60)
        yield cluster
    finally:
        started = descendants() - before
        cluster.shutdown()
        assert wait_gone(started, 30), "Ray processes outlived the cluster"


def run_overrides(run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [
        *TRAIN_TINY,
        "transport=process",
        f"trainer.max_steps={steps}",
        f"trainer.eval_every={steps}",
        f"trainer.ckpt_every={steps}",
        f"run_dir={run_dir}",
        *extra,
    ]


def on(cluster: Cluster) -> list[str]:
    return ["transport.launch=ray", f"transport.ray.address={cluster.address}"]


def node_of(worker_log: Path) -> str:
    line = next(line for line in worker_log.read_text().splitlines() if "in a Ray actor on node" in line)
    return line.split("on node ")[1].split(" ")[0]


@pytest.mark.timeout(300)
def test_one_worker_per_node_trains_exactly_as_launch_local(cluster, tmp_path, caplog):
    from moe.engine.loop import train

    caplog.set_level(logging.INFO, logger="experts")  # actors log at the trainer's level: their node

    steps = 30
    train(compose(run_overrides(tmp_path / "local", steps, "transport.launch=local")))
    train(compose(run_overrides(tmp_path / "ray", steps, *on(cluster))))
    local, placed = train_losses(tmp_path / "local"), train_losses(tmp_path / "ray")
    assert len(local) == len(placed) == steps
    assert max(abs(a - b) for a, b in zip(local, placed, strict=True)) < 1e-5
    nodes = {node_of(tmp_path / "ray" / "workers" / name / "worker.log") for name in ("w0", "w1")}
    assert len(nodes) == 2  # Ray placed one actor on each node
    assert not ray.is_initialized()  # the run disconnected from the cluster it connected to


def actor_pid(name: str, seconds: float) -> int:
    """The pid of named actor `name` once it answers (a restarting actor answers from its new process)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return ray.get(ray.get_actor(name, namespace="poimoe").pid.remote(), timeout=10)
        except (ValueError, ray.exceptions.RayError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.timeout(400)
def test_a_killed_worker_actor_is_restarted_rejoins_from_its_checkpoint_and_the_run_ends_cleanly(
    cluster, tmp_path
):
    run_dir, steps = tmp_path / "run", 150
    overrides = run_overrides(run_dir, steps, *on(cluster), "transport.checkpoint_every=5")
    command = [sys.executable, "train.py", *overrides, f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = {**os.environ, "PYTHONPATH": python_path()}
    trainer = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    ray.init(address=cluster.address, log_to_driver=False)
    pids: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while _last_step(run_dir) < 8 and trainer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # w1 has checkpointed itself at step 5
        assert trainer.poll() is None, "the run ended before the worker could be killed"
        names = [f"poimoe-{trainer.pid}-w{i}" for i in range(2)]
        pids = {actor_pid(name, 30) for name in names}
        killed = actor_pid(names[1], 10)
        os.kill(trainer.pid, signal.SIGSTOP)  # so the restart lands mid-run however fast the run is
        try:
            killed_at = _last_step(run_dir)
            ray.kill(ray.get_actor(names[1], namespace="poimoe"), no_restart=False)
            assert wait_gone({killed}, 30)
            restarted = actor_pid(names[1], 90)  # the same name answers from the restarted actor
        finally:
            os.kill(trainer.pid, signal.SIGCONT)
        pids.add(restarted)
        assert restarted != killed
        output, _ = trainer.communicate(timeout=240)
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait(timeout=10)
        ray.shutdown()
    assert trainer.returncode == 0, output[-3000:]
    assert "worker w1 rejoined" in output
    w1_log = (run_dir / "workers" / "w1" / "worker.log").read_text()
    assert "(restarted: True)" in w1_log
    assert "restored " in w1_log.split("(restarted: True)")[1]  # its experts, from its own checkpoint
    losses = train_losses(run_dir)
    assert len(losses) == steps
    assert all(map(math.isfinite, losses))
    after = losses[killed_at:]
    assert sum(after[-10:]) / 10 < sum(after[:5]) / 5
    assert wait_gone(pids, 30), "worker actors outlived the run"


@pytest.mark.timeout(180)
def test_an_embedded_ray_serves_the_run_and_stops_with_it(tmp_path):
    before = descendants()
    with process_transport(tmp_path, launch="ray", workers=1) as transport:
        pool = transport.make_pool("layer", make_experts(), EXPERTS_CFG)
        answered_E = run_layer(pool, torch.randn(NUM_TOKENS, D), PAIRS)[3]
        started = descendants() - before
        assert ray.is_initialized()
    assert answered_E.all()
    assert not ray.is_initialized()
    assert started  # the embedded Ray's processes
    assert wait_gone(started, 30), "the embedded Ray outlived its run"


@pytest.mark.timeout(120)
def test_workers_ray_cannot_place_fail_at_the_register_timeout_naming_what_they_asked_for(cluster, tmp_path):
    from experts.remote import ProcessTransport, ProcessTransportConfig
    from experts.remote.ray_launch import RayLaunchConfig

    on_gpus = RayLaunchConfig(address=cluster.address, num_gpus=1)  # the cluster has none
    cfg = ProcessTransportConfig(launch="ray", ray=on_gpus, register_timeout=3.0)
    with pytest.raises(RuntimeError, match=r"did not register within 3s.*num_gpus=1; Ray has"):
        ProcessTransport(cfg, device=torch.device("cpu"), run_dir=tmp_path, seed=0)
    assert not ray.is_initialized()
