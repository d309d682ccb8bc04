"""`transport.launch`: who starts the workers (local subprocesses, Ray actors, or a person by hand).

Bad launch options fail before anything starts, naming the bad value; none of these tests needs Ray.
The Ray launch itself is tested in `test_ray_launch.py`.
"""

from __future__ import annotations

import re
import socket
import sys

import pytest
import torch

from experts.remote import ProcessTransport, ProcessTransportConfig
from experts.remote.ray_launch import RayLaunchConfig
from experts.transport import open_transport
from moe.errors import ConfigError
from tests.experts.test_remote import hand_worker, process_transport
from tests.helpers import compose


def open_process_transport(**overrides) -> ProcessTransport:
    return ProcessTransport(
        ProcessTransportConfig(**overrides), device=torch.device("cpu"), run_dir=None, seed=0
    )


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"launch": "slurm"}, "transport.launch='slurm'; valid: local, ray, manual"),
        (
            {"ray": RayLaunchConfig(num_gpus=1)},
            "transport.ray.num_gpus=1 is set but transport.launch='local'",
        ),
        ({"launch": "manual", "ray": RayLaunchConfig(address="auto")}, "transport.ray.address='auto'"),
        ({"launch": "ray", "ray": RayLaunchConfig(num_cpus=-1)}, "transport.ray.num_cpus=-1"),
        ({"launch": "ray", "ray": RayLaunchConfig(max_restarts=-2)}, "transport.ray.max_restarts=-2"),
        ({"launch": "ray", "devices": ["cuda:1"]}, "transport.devices=['cuda:1'] is for launch=local"),
        ({"launch": "ray", "external_workers": 1}, "need their hotkeys in transport.allowed_keys"),
    ],
)
@pytest.mark.timeout(30)
def test_bad_launch_options_fail_before_anything_starts_naming_the_value(overrides, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        open_process_transport(**overrides)


@pytest.mark.timeout(30)
def test_launch_options_compose_typed_and_are_checked_when_the_transport_opens():
    cfg = compose(["transport=process", "transport.ray.num_gpus=1"])
    assert cfg.transport.launch == "local"
    with pytest.raises(ConfigError, match=re.escape("transport.ray.num_gpus=1.0 is set")):
        open_transport(cfg.transport, device=torch.device("cpu"), run_dir=None, seed=0)
    with pytest.raises(Exception, match="num_gpu"):  # a typo fails when the config loads
        compose(["transport=process", "transport.ray.num_gpu=1"])


@pytest.mark.timeout(30)
def test_launch_ray_without_ray_installed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ConfigError, match=re.escape("pip install 'poimoe[ray]'")):
        open_process_transport(launch="ray")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.timeout(60)
def test_launch_manual_spawns_nothing_and_waits_for_workers_started_by_hand(tmp_path):
    port = free_port()
    worker = hand_worker(f"tcp://127.0.0.1:{port}", "by-hand")  # it says HELLO until the trainer listens
    try:
        manual = {"launch": "manual", "workers": 1, "address": "tcp", "port": port, "auth": "none"}
        with process_transport(tmp_path, **manual) as transport:
            assert transport.processes == []
            assert transport.coordinator.registered_names() == ["by-hand"]
    finally:
        worker.kill()
        worker.wait(timeout=10)
