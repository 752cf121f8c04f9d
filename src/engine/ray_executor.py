"""The `ray` executor backend: one replica's ranks placed and started by Ray.

`EngineConfig.distributed_executor_backend = "ray"`: the executor (`engine.executor`) joins a
Ray cluster (`ray_address`, else $RAY_ADDRESS, else a new local one), reserves the replica's
ranks with one placement group (`RayRanks._layouts`: one bundle per pipeline stage holding its
TP ranks, so a TP group shares a node, strategy SPREAD so that stages go to distinct nodes where
the cluster has room, and away from the nodes this process's other replicas hold; fallbacks
in order, each logged; docs/RAY.md) and starts each rank as a `RankActor` in its bundle, ranks
numbered bundle by bundle, the engine's node first. The actor starts the same worker
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
import inspect
import logging
import os
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
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


_NODE_LABEL = "ray.io/node-id"  # the label Ray gives every node: its node id
_PATIENCE_S = 2.0  # how long a preferred layout may be reported without room before the next
_POLL_S = 0.1
_RELEASE_S = 5.0  # how long a removed group's resources may take to show as free again
_LIVE: weakref.WeakSet[RayRanks] = weakref.WeakSet()  # this process's placed replicas
_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _placement_lock() -> asyncio.Lock:
    """One placement at a time per event loop: a replica sees the nodes the others took."""
    return _LOCKS.setdefault(asyncio.get_running_loop(), asyncio.Lock())


def _holds(resources: Mapping[str, float], bundle: Mapping[str, float]) -> bool:
    return all(resources.get(key, 0.0) >= amount for key, amount in bundle.items())


def _accepts(argument: str) -> bool:
    """Whether this Ray's `placement_group` takes `argument` (labels: Ray >= 2.46 or so)."""
    from ray.util.placement_group import placement_group

    return argument in inspect.signature(placement_group).parameters


@dataclass(frozen=True)
class _Layout:
    """One way to reserve a replica's ranks: the placement group's bundles and strategy,
    which bundle each rank goes to (in rank order), and the nodes its bundles must avoid."""

    bundles: list[dict[str, float]]
    strategy: str
    slots: list[int]
    avoid: frozenset[str] = frozenset()
    soft_target: str | None = None

    def describe(self) -> str:
        per = "pipeline stage" if len(set(self.slots)) < len(self.slots) else "rank"
        away = f", away from {len(self.avoid)} node(s) of other replicas" if self.avoid else ""
        return f"one bundle {self.bundles[0]} per {per}, {self.strategy}{away}"

    def group_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.avoid:
            selector = {_NODE_LABEL: f"!in({','.join(sorted(self.avoid))})"}
            options["bundle_label_selector"] = [selector] * len(self.bundles)
        if self.soft_target is not None:
            options["_soft_target_node_id"] = self.soft_target
        return options


async def _until_released(before: Mapping[str, float], bundles: list[dict[str, float]]) -> None:
    """Wait (up to `_RELEASE_S`) until the cluster's free resources have grown by what the
    removed group's `bundles` held: Ray hands them back a moment after the removal, and a
    replica placed again at once (a restart) would otherwise miss its former node."""
    import ray

    held: dict[str, float] = {}
    for bundle in bundles:
        for key, amount in bundle.items():
            held[key] = held.get(key, 0.0) + amount
    deadline = time.monotonic() + _RELEASE_S
    while held and time.monotonic() < deadline:
        free = await asyncio.to_thread(ray.available_resources)
        if all(free.get(key, 0.0) >= before.get(key, 0.0) + n - 1e-6 for key, n in held.items()):
            return
        await asyncio.sleep(_POLL_S)


class RayRanks:
    """One replica's placement group and rank actors."""

    def __init__(
        self, world_size: int, dp_rank: int, *, num_cpus: int, num_gpus: int, tp_size: int = 1
    ) -> None:
        self.world_size = world_size
        self.dp_rank = dp_rank
        self.tp_size = tp_size
        self.bundle = {"CPU": float(num_cpus), **({"GPU": float(num_gpus)} if num_gpus else {})}
        self.ranks: dict[int, RayRank] = {}
        self.held_nodes: frozenset[str] = frozenset()  # the nodes this replica's ranks run on
        self._pg: Any = None
        self._placed = False  # whether Ray placed `_pg` (holds its resources)
        self.engine_node_id = ""
        self.engine_ip = ""

    @property
    def pp_size(self) -> int:
        return self.world_size // self.tp_size

    def _layouts(self, nodes: list[dict[str, Any]], others: frozenset[str]) -> list[_Layout]:
        """The layouts to try, best first.

        1. One bundle per pipeline stage holding its TP ranks' resources (a bundle is one node:
           the TP group shares it), SPREAD over the stages (distinct nodes where the cluster
           has room, Ray shares nodes where not); one stage: STRICT_PACK, on the engine's node
           where it has room (shared memory to the ranks). Only where some node can hold a
           stage.
        2. With tensor parallelism: one bundle per rank, PACK (a TP group larger than any
           node, or no room for a whole stage on one node now).
        Each first away from the nodes other replicas of this process hold (where some other
        node can hold a bundle), then anywhere."""
        alive = [n for n in nodes if n.get("Alive")]
        stage = {key: amount * self.tp_size for key, amount in self.bundle.items()}
        labels = _accepts("bundle_label_selector")
        layouts: list[_Layout] = []
        candidates: list[tuple[dict[str, float], str, list[int]]] = []
        if any(_holds(n.get("Resources", {}), stage) for n in alive):
            strategy = "SPREAD" if self.pp_size > 1 else "STRICT_PACK"
            slots = [s for s in range(self.pp_size) for _ in range(self.tp_size)]
            candidates.append((stage, strategy, slots))
        elif self.tp_size > 1:
            logger.warning(
                "replica %d: no Ray node can hold a pipeline stage's %d ranks (%s); "
                "its TP group spans nodes",
                self.dp_rank,
                self.tp_size,
                stage,
            )
        if self.tp_size > 1 or not candidates:
            candidates.append((dict(self.bundle), "PACK", list(range(self.world_size))))
        for bundle, strategy, slots in candidates:
            count = len(set(slots))
            target = None
            if strategy == "STRICT_PACK" and _accepts("_soft_target_node_id"):
                target = self.engine_node_id if self.engine_node_id not in others else None
            elsewhere = [
                n for n in alive if n["NodeID"] not in others and _holds(n["Resources"], bundle)
            ]
            if others and labels and elsewhere:
                layouts.append(_Layout([bundle] * count, strategy, slots, others, target))
            layouts.append(_Layout([bundle] * count, strategy, slots, soft_target=target))
        return layouts

    async def place(self, address: str | None, wait_s: float) -> None:
        """Join the cluster, reserve the placement group (within `wait_s` seconds) and create
        one actor per rank; raises ConnectionError when the cluster cannot be joined and
        TimeoutError naming what could not be placed."""
        import ray

        connect(address)
        self.engine_node_id = ray.get_runtime_context().get_node_id()
        self.engine_ip = ray.util.get_node_ip_address()
        deadline = time.monotonic() + wait_s
        async with _placement_lock():
            others = frozenset(n for r in _LIVE if r is not self for n in r.held_nodes)
            layouts = self._layouts(await asyncio.to_thread(ray.nodes), others)
            for index, layout in enumerate(layouts):
                last = index == len(layouts) - 1
                if await self._reserve(layout, deadline, until_deadline=last):
                    break
                if last or time.monotonic() >= deadline:
                    break
                logger.info(
                    "replica %d: Ray has no room for %s; trying %s",
                    self.dp_rank,
                    layout.describe(),
                    layouts[index + 1].describe(),
                )
            if self._pg is None:
                raise TimeoutError(
                    f"Ray could not place replica {self.dp_rank}'s {self.world_size} ranks "
                    f"({self.bundle} each) in {wait_s:.0f} s; the cluster has "
                    f"{ray.available_resources()} free"
                )
            await self._start_actors(layout)
            self.held_nodes = frozenset(h.node_id for h in self.ranks.values())
            _LIVE.add(self)
            self._report(others)

    async def _reserve(self, layout: _Layout, deadline: float, *, until_deadline: bool) -> bool:
        """Create `layout`'s placement group and wait until it is placed (True) or the deadline
        passes; unless `until_deadline`, also give up once Ray reports it cannot place it
        (infeasible, or no room for `_PATIENCE_S`). The group is removed when given up."""
        from ray.util.placement_group import (
            placement_group,
            placement_group_table,
            remove_placement_group,
        )

        self._pg = placement_group(
            layout.bundles,
            strategy=layout.strategy,
            name=f"shardline-{os.getpid()}-dp{self.dp_rank}-{id(self):x}",
            **layout.group_options(),
        )
        ready = self._pg.ready().future()
        no_room_since: float | None = None
        while not ready.done():
            now = time.monotonic()
            if now >= deadline:
                break
            if not until_deadline:
                table = await asyncio.to_thread(placement_group_table, self._pg)
                state = table.get("stats", {}).get("scheduling_state")
                if state == "INFEASIBLE":
                    break
                if state == "NO_RESOURCES":
                    no_room_since = now if no_room_since is None else no_room_since
                    if now - no_room_since >= _PATIENCE_S:
                        break
                else:
                    no_room_since = None
            await asyncio.sleep(min(_POLL_S, max(0.0, deadline - now)))
        if ready.done() and ready.exception() is None:
            self._placed = True
            return True
        remove_placement_group(self._pg)
        self._pg = None
        return False

    async def _start_actors(self, layout: _Layout) -> None:
        """One actor per rank in its layout bundle; ranks numbered bundle by bundle, bundles
        in node order, the engine's node first: rank 0 (the output rank without pipeline
        stages) talks to the engine over shared memory when it can, and a TP group (its
        consecutive ranks) shares a node wherever the bundles allow."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor_class = _actor_class()
        actors = [
            actor_class.options(
                max_concurrency=4,  # `wait` holds a thread for the rank's life; `stop` needs another
                num_cpus=self.bundle["CPU"],
                num_gpus=self.bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=slot
                ),
            ).remote()
            for slot in layout.slots
        ]
        nodes = await asyncio.gather(*(_resolve(actor.node.remote()) for actor in actors))
        by_slot: dict[int, list[int]] = {}
        for index, slot in enumerate(layout.slots):
            by_slot.setdefault(slot, []).append(index)
        node_of = {slot: nodes[members[0]][0] for slot, members in by_slot.items()}
        order = sorted(by_slot, key=lambda s: (node_of[s] != self.engine_node_id, node_of[s], s))
        indices = [index for slot in order for index in by_slot[slot]]
        for rank, index in enumerate(indices):
            self.ranks[rank] = RayRank(rank, actors[index], *nodes[index])

    def _report(self, others: frozenset[str]) -> None:
        """Log where the ranks went, and each preference the cluster had no room for."""
        stages = [
            {self.ranks[r].node_id for r in range(s * self.tp_size, (s + 1) * self.tp_size)}
            for s in range(self.pp_size)
        ]
        logger.info(
            "replica %d placed by Ray: pipeline stage -> node(s) %s",
            self.dp_rank,
            [sorted(n[:8] for n in nodes) for nodes in stages],
        )
        shared = sorted(
            {n[:8] for i, a in enumerate(stages) for b in stages[i + 1 :] for n in a & b}
        )
        if shared:
            logger.warning(
                "replica %d: its %d pipeline stages share Ray node(s) %s: the cluster has no "
                "room to give each stage its own node",
                self.dp_rank,
                self.pp_size,
                shared,
            )
        if self.held_nodes & others:
            logger.warning(
                "replica %d shares Ray node(s) %s with other replicas: the cluster has no room "
                "for it elsewhere",
                self.dp_rank,
                sorted(n[:8] for n in self.held_nodes & others),
            )

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
        self.held_nodes = frozenset()
        _LIVE.discard(self)
        if self._pg is not None:
            placed = [dict(bundle) for bundle in self._pg.bundle_specs] if self._placed else []
            before = ray.available_resources() if placed else {}
            remove_placement_group(self._pg)
            self._pg = None
            self._placed = False
            await _until_released(before, placed)
