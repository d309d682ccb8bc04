"""`RayWorkers.close` ends every actor and the Ray connection even when one kill fails (runs without the
ray extra: Ray is replaced by a recording stand-in)."""

from __future__ import annotations

import logging

from experts.remote.ray_launch import RayWorkers


class RecordingRay:
    """Ray's kill, is_initialized and shutdown, recording calls; killing `refuses` raises as Ray does
    for an actor whose creation it is still cancelling."""

    def __init__(self, refuses: str):
        self.refuses, self.killed, self.shut_down = refuses, [], False

    def kill(self, actor, no_restart: bool) -> None:
        if actor == self.refuses:
            raise RuntimeError("System error: Actor creation cancelled.")
        self.killed.append((actor, no_restart))

    def is_initialized(self) -> bool:
        return not self.shut_down

    def shutdown(self) -> None:
        self.shut_down = True


def test_a_failed_kill_is_logged_and_the_other_actors_and_ray_still_end(caplog):
    workers = RayWorkers.__new__(RayWorkers)  # no Ray: only what close() touches
    workers.ray = RecordingRay(refuses="actor-w0")
    workers.actors = {"w0": "actor-w0", "w1": "actor-w1", "w2": "actor-w2"}
    workers.connected_here = True
    with caplog.at_level(logging.WARNING, logger="experts.remote.ray_launch"):
        workers.close()
    assert workers.ray.killed == [("actor-w1", True), ("actor-w2", True)]
    assert workers.ray.shut_down
    assert workers.actors == {}
    assert "could not kill worker actor w0: System error: Actor creation cancelled." in caplog.text
