"""`transport=process`: experts in worker processes. `spawn` (the transport), `coordinator` (the
trainer's socket and worker registry), `client` (the pool), `worker` (the miner), `wire` (framing),
`settings` (what a worker is told and its own limits), `auth` (keys and CURVE), `checkpoint` (a
worker's own checkpoint file)."""

from experts.remote.client import RemotePool
from experts.remote.coordinator import Coordinator
from experts.remote.spawn import ProcessTransport, ProcessTransportConfig

__all__ = ["Coordinator", "ProcessTransport", "ProcessTransportConfig", "RemotePool"]
