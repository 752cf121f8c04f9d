"""shardline's transport layer: typed messages between the engine and its workers.

`messages` defines the wire protocol; `base` the `Transport` interface and errors; `inproc`,
`shm` and `tcp` implement it; `channels` is the engine <-> worker facade the executor uses.
"""

from shardline.transport.channels import (
    EngineChannels,
    WorkerChannels,
    connect_worker_channels,
    open_engine_channels,
)
from shardline.transport.errors import (
    AuthenticationError,
    MessageTooLarge,
    TransportBroken,
    TransportClosed,
    TransportError,
)

__all__ = [
    "AuthenticationError",
    "EngineChannels",
    "MessageTooLarge",
    "TransportBroken",
    "TransportClosed",
    "TransportError",
    "WorkerChannels",
    "connect_worker_channels",
    "open_engine_channels",
]
