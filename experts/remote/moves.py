"""Moving a remote expert to another worker (a market move): its parameters and optimizer state go
with it, so training continues where it was.

The state comes from the old owner when it still answers (its current state), else from the old
owner's own last checkpoint (`RemotePool.owner_checkpoint`); with neither, the expert restarts from
the parameters it was first hosted with (logged). The new owner gets HOST (parameters, the new link
and its stream) then LOAD_STATE (parameters and optimizer state).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from experts.network import LinkSpec, NetworkConfig, link_for, link_stream, placed_stream
from experts.remote.wire import Kind, Message, expert_state_message

if TYPE_CHECKING:
    from experts.remote.client import RemotePool

log = logging.getLogger(__name__)


def placed_links(network: NetworkConfig | None, seed: int, layer: str, hosts: list[str],
                 links: list[LinkSpec] | None) -> tuple[list[LinkSpec], list[list], list[list]]:  # fmt: skip
    """(links, link streams, base streams) of a pool's experts: the network's, or a market placement's
    `links` with streams named by each expert's host."""
    base = [link_stream(seed, network, layer, e) for e in range(len(hosts))]
    if links is None:
        return [link_for(network, e) for e in range(len(hosts))], list(base), base
    return list(links), [placed_stream(s, host) for s, host in zip(base, hosts, strict=True)], base


def carried_state(pool: RemotePool, expert: int) -> tuple[tuple[dict, dict] | None, str]:
    """(parameters, optimizer state) to carry, and where they came from."""
    source = pool.hosts[expert]
    pool.coordinator.drain()
    if pool.coordinator.is_alive(source):
        key = (next(pool.coordinator.request_ids), pool.layer, expert)
        result = pool.coordinator.request({key: (source, Message(Kind.GET_STATE, *key))}, Kind.STATE)[key]
        state = pool.checked_state(expert, result) if not isinstance(result, str) else None
        if state is not None:
            return state, f"{source} (alive)"
    state = pool.owner_checkpoint(expert)
    return state, f"{source}'s last checkpoint" if state is not None else "nowhere"


def move_remote_expert(pool: RemotePool, expert: int, link: LinkSpec, host: str | None) -> None:
    """Host `expert` of `pool` on worker `host` behind `link`, with its state carried over."""
    if host is None or host not in pool.coordinator.workers:
        raise ValueError(f"cannot move expert {pool.layer_name}/{expert} to unknown worker {host!r}")
    state, origin = carried_state(pool, expert)
    if state is None:
        log.warning("expert %s/%d: no state to carry (old owner dead, no checkpoint); it restarts from "
                    "its initial parameters on %s", pool.layer_name, expert, host)  # fmt: skip
    pool.hosts[expert], pool.links[expert] = host, link
    pool.link_streams[expert] = placed_stream(pool.base_streams[expert], host)
    params = state[0] if state is not None else None
    requests = {}
    hosting = pool.host_message(expert, restore=False, params=params)
    requests[(hosting.step, pool.layer, expert)] = (host, hosting)
    failed = _request(pool, requests, Kind.HOSTED)
    if state is not None and not failed:
        key = (next(pool.coordinator.request_ids), pool.layer, expert)
        loading = expert_state_message(Kind.LOAD_STATE, *state, step=key[0], layer=pool.layer, expert=expert)
        failed = _request(pool, {key: (host, loading)}, Kind.LOADED)
    if failed:
        pool.record_failures({expert: f"host: {failed}"}, replace=False)
        log.warning("expert %s/%d could not move to %s: %s", pool.layer_name, expert, host, failed)
    else:
        log.info("expert %s/%d moved to %s with the state of %s", pool.layer_name, expert, host, origin)
    pool.memory.succeeded(expert)
    pool.published[expert] = {}


def _request(pool: RemotePool, requests: dict, reply: Kind) -> str | None:
    """The failure reason of a one-request round, or None when it was answered."""
    result = next(iter(pool.coordinator.request(requests, reply).values()))
    return result if isinstance(result, str) else None
