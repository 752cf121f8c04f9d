"""The `ray` executor backend: one replica's ranks placed and started by Ray.

`EngineConfig.distributed_executor_backend = "ray"`: the executor (`engine.executor`) joins a
Ray cluster (`ray_address`, else $RAY_ADDRESS, else a new local one), reserves the replica's
ranks with one placement group (one bundle per rank, in rank order, strategy PACK: a replica's
ranks share a node where they fit; what does not fit goes to other nodes; ranks are numbered
node by node, the engine's node first, so a TP group's consecutive ranks share a node where
they can) and starts each rank as a `RankActor` in its bundle. The actor starts the same worker
program as the `mp` backend (`worker.launch.launch_worker`, the config on the program's
stdin) and watches it; its `wait` call runs as long as the rank does, so the executor learns of
a rank's end (its exit status) or of the actor's or its node's death (Ray fails the call) as
soon as Ray does.

Everything on the step path stays shardline's: ranks on the engine's node attach over shared
memory, the others over authenticated TCP. The TCP token reaches the ranks only as an
argument of their actor's `start` call (never logged, never inside the config sent);
torch.distributed meets at rank 0's node address and a port free there. Each rank gets its Ray
node id as `SHARDLINE_HOST_ID`, so ranks on different Ray nodes never share memory with each
other (gloo between them), even when the nodes are containers of one machine.

Resources a rank asks for: {"CPU": num_threads or 1} (it runs that many threads), plus
{"GPU": 1} on CUDA. Shutting down stops the worker programs, kills the actors and removes
the placement group.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

from shardline.worker.launch import WorkerProcess, describe_exit, launch_worker, reap_workers

logger = logging.getLogger("shardline.executor")

HOST_ID_ENV = "SHARDLINE_HOST_ID"


class RankActor:
    """One rank's Ray actor: starts the worker program on its node and waits for its end.

    Made a Ray actor by `_actor_class`, threaded (`wait` blocks one thread for the rank's
    life while `stop` runs on another)."""

    def __init__(self) -> None:
        self._process: WorkerProcess | None = None

    def node(self) -> tuple[str, str]:
        """(Ray node id, node IP address) of this actor."""
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def free_port(self, host: str) -> int:
        """A port free on this node (rank 0's: torch.distributed's rendezvous)."""
        from shardline.engine.executor import free_port

        return free_port(host)

    def start(self, config: Mapping[str, Any], token: str | None) -> int:
        """Start the rank's worker program; returns its pid. `token`: the TCP token of the
        engine's channels when some rank attaches over TCP (added to the config here, on the
        rank's own node, and so to the program's stdin)."""
        import ray

        from shardline.transport.channels import with_tcp_secrets

        worker_config = {**config, "parent_pid": os.getpid()}  # the rank watches this actor
        if token is not None:
            worker_config["channels_address"] = with_tcp_secrets(
                dict(config["channels_address"]), token.encode(), None
            )
        env = dict(os.environ)
        env[HOST_ID_ENV] = ray.get_runtime_context().get_node_id()
        self._process = launch_worker(worker_config, env=env)
        return self._process.pid

    def wait(self) -> int | None:
        """Block until the worker program exits; its exit status (-N: killed by signal N)."""
        assert self._process is not None
        return self._process.wait()

    def stop(self, grace: float) -> None:
        """Wait up to `grace` seconds for the program to exit, then terminate and kill it."""
        if self._process is not None:
            reap_workers([self._process], grace)


def _actor_class() -> Any:
    import ray

    return ray.remote(RankActor)


def connect(address: str | None) -> None:
    """Join the Ray cluster (`address`, else $RAY_ADDRESS, else start a local one), unless
    this process already did (`ray.init` by the application)."""
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or None
    try:
        ray.init(address=target, include_dashboard=False, logging_level=logging.WARNING)
    except Exception as exc:  # noqa: BLE001 - ray.init raises ValueError, ConnectionError, RuntimeError...
        where = f"the Ray cluster at {target!r}" if target else "a new local Ray instance"
        raise ConnectionError(f"cannot join {where}: {type(exc).__name__}: {exc}") from exc


async def _resolve(ref: Any) -> Any:
    """Await a Ray ObjectRef without blocking the event loop."""
    return await asyncio.wrap_future(ref.future())


class RayRank:
    """The executor's handle on one rank run by a `RankActor`."""

    def __init__(self, rank: int, actor: Any, node_id: str, ip: str) -> None:
        self.rank = rank
        self.actor = actor
        self.node_id = node_id
        self.ip = ip
        self.pid: int | None = None
        self._end: tuple[bool, str] | None = None  # (killed, how it ended) once it did

    def is_alive(self) -> bool:
        return self._end is None

    def exit_reason(self) -> tuple[bool, str]:
        return self._end or (False, "running")

    async def watch(self) -> None:
        """Until the rank ends: its exit status, or its actor's (or node's) death."""
        import ray

        try:
            code = await _resolve(self.actor.wait.remote())
            self._end = (code is not None and code < 0, describe_exit(code))
        except ray.exceptions.RayError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self._end = (True, f"its Ray actor died ({type(exc).__name__}: {first})")


class RayRanks:
    """One replica's placement group and rank actors."""

    def __init__(self, world_size: int, dp_rank: int, *, num_cpus: int, num_gpus: int) -> None:
        self.world_size = world_size
        self.dp_rank = dp_rank
        self.bundle = {"CPU": float(num_cpus), **({"GPU": float(num_gpus)} if num_gpus else {})}
        self.ranks: dict[int, RayRank] = {}
        self._pg: Any = None
        self.engine_node_id = ""
        self.engine_ip = ""

    async def place(self, address: str | None, wait_s: float) -> None:
        """Join the cluster, reserve the placement group (within `wait_s` seconds) and create
        one actor per rank; raises ConnectionError when the cluster cannot be joined and
        TimeoutError naming what could not be placed."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        connect(address)
        self.engine_node_id = ray.get_runtime_context().get_node_id()
        self.engine_ip = ray.util.get_node_ip_address()
        self._pg = placement_group(
            [dict(self.bundle)] * self.world_size,
            strategy="PACK",
            name=f"shardline-{os.getpid()}-dp{self.dp_rank}-{id(self):x}",
        )
        try:
            await asyncio.wait_for(_resolve(self._pg.ready()), wait_s)
        except TimeoutError:
            raise TimeoutError(
                f"Ray could not place replica {self.dp_rank}'s {self.world_size} ranks "
                f"({self.bundle} each) in {wait_s:.0f} s; the cluster has "
                f"{ray.available_resources()} free"
            ) from None
        actor_class = _actor_class()
        actors = [
            actor_class.options(
                max_concurrency=4,  # `wait` holds a thread for the rank's life; `stop` needs another
                num_cpus=self.bundle["CPU"],
                num_gpus=self.bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=bundle
                ),
            ).remote()
            for bundle in range(self.world_size)
        ]
        nodes = await asyncio.gather(*(_resolve(actor.node.remote()) for actor in actors))
        # Ranks in node order, the engine's node first: consecutive ranks (a TP group) share
        # a node wherever the bundles allow, and rank 0 (the output rank without pipeline
        # stages) talks to the engine over shared memory when it can.
        order = sorted(
            range(self.world_size),
            key=lambda b: (nodes[b][0] != self.engine_node_id, nodes[b][0], b),
        )
        for rank, bundle in enumerate(order):
            self.ranks[rank] = RayRank(rank, actors[bundle], *nodes[bundle])

    @property
    def remote_ranks(self) -> list[int]:
        """Ranks on other nodes than the engine's (they attach over TCP)."""
        return [r for r, h in self.ranks.items() if h.node_id != self.engine_node_id]

    async def rendezvous(self) -> str:
        """torch.distributed's init method: rank 0's node address and a port free there."""
        rank0 = self.ranks[0]
        port = await _resolve(rank0.actor.free_port.remote(rank0.ip))
        return f"tcp://{rank0.ip}:{port}"

    async def start(self, rank: int, config: Mapping[str, Any], token: str | None) -> RayRank:
        handle = self.ranks[rank]
        handle.pid = await _resolve(handle.actor.start.remote(dict(config), token))
        logger.debug(
            "started rank %d (dp %d) as pid %s on Ray node %s",
            rank,
            self.dp_rank,
            handle.pid,
            handle.node_id,
        )
        return handle

    async def aclose(self, grace: float) -> None:
        """Stop the worker programs (within `grace` s, then terminate/kill), kill the actors,
        remove the placement group. Idempotent; tolerates dead actors and nodes."""
        import ray
        from ray.util.placement_group import remove_placement_group

        live = [h for h in self.ranks.values() if h.is_alive()]
        if live:
            stops = [_resolve(h.actor.stop.remote(grace)) for h in live]
            try:
                await asyncio.wait_for(asyncio.gather(*stops, return_exceptions=True), grace + 10.0)
            except TimeoutError:
                logger.warning(
                    "replica %d: Ray rank actors did not stop in time; killing them", self.dp_rank
                )
        for handle in self.ranks.values():
            try:
                ray.kill(handle.actor)
            except Exception as exc:  # noqa: BLE001 - an actor Ray already lost
                logger.debug("ray.kill(rank %d): %s", handle.rank, exc)
        self.ranks.clear()
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
