"""Executor: starts one replica's worker group, drives steps through it, watches its health.

The executor is the EngineCore's only view of the workers:

    start(task_group)  start ranks (`python -m shardline.worker` processes, or one thread for
                       `inproc`), wait for WorkerReady
    execute(step)      broadcast one ExecuteStep, await the output rank's StepResult
    shutdown()         Shutdown -> wait -> terminate -> kill; idempotent

Health: a worker is dead when its process (or thread) is gone, when it reports WorkerError, or
when nothing (heartbeat or result) arrives from it for `worker_timeout` seconds. Any of these
sets `failure` and the `failed` event, and `execute` raises `WorkerFailure`, so the EngineCore
notices within the timeout whether or not a step is in flight, and decides whether to restart.
The failure names its cause: a rank killed by a signal at once ("killed by SIGKILL"); a rank
that exited with an error status is given `_EXIT_GRACE` seconds for its own WorkerError (sent
just before it exits) to be read, so the caller sees the worker's error text, not only the
status; survivors' errors about a dead peer (a broken collective) name the peer.
The executor's background tasks end by themselves once it fails or shuts down, so a new
executor can be started in the same task group.

Multi-node (`nodes > 1`): this process is node 0; node K's ranks are started by its agent
(`engine.remote`), which connects to `head_host:head_port` and gets their WorkerConfigs as
InitWorker messages. Ranks on this node keep shared memory, the others attach over
authenticated TCP (`mixed` channels); torch.distributed meets at `rendezvous_host`, where rank
0's store listens on that address only (`model.parallel_context`). The configs sent to other
nodes hold no token and no TLS paths: each agent adds its own. With `tls_certfile`,
`tls_keyfile` and `tls_ca_certs` the agents' link and the remote ranks' channels use mutual TLS.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.abc

from shardline.engine.config import KV_CACHE_DTYPES, EngineConfig
from shardline.engine.errors import EngineDeadError
from shardline.engine.remote import NodeServer
from shardline.model.registry import ModelRegistry
from shardline.transport import EngineChannels, open_engine_channels
from shardline.transport.base import TransportBroken, TransportClosed
from shardline.transport.channels import without_tcp_secrets
from shardline.transport.errors import TransportError
from shardline.transport.messages import (
    ExecuteStep,
    Heartbeat,
    Hello,
    Message,
    Shutdown,
    StepResult,
    WorkerError,
    WorkerReady,
)
from shardline.transport.tcp import TlsConfig
from shardline.worker.launch import WorkerProcess, describe_exit, launch_worker, reap_workers

if TYPE_CHECKING:
    from shardline.engine.ray_executor import RayRanks

logger = logging.getLogger("shardline.executor")

_MONITOR_PERIOD = 0.1
_EXIT_GRACE = 0.5  # a rank that exited with an error status: time for its WorkerError to arrive


class WorkerFailure(EngineDeadError):
    """A worker died, hung, or reported an error; the replica's worker group is unusable."""

    def __init__(self, rank: int | None, reason: str) -> None:
        self.rank = rank
        self.reason = reason
        who = "worker group" if rank is None else f"worker rank {rank}"
        super().__init__(f"{who} failed: {reason}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for torch.distributed's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class _Handle(Protocol):
    """A running rank: a worker process (`WorkerProcess`), a thread, or a rank on another node."""

    def is_alive(self) -> bool: ...


@dataclass
class _RemoteHandle:
    """A rank on another node: alive until its agent reports it dead or goes away."""

    nodes: NodeServer
    rank: int

    def is_alive(self) -> bool:
        return self.nodes.rank_alive(self.rank)


@dataclass
class _ThreadHandle:
    thread: threading.Thread

    def is_alive(self) -> bool:
        return self.thread.is_alive()


class Executor:
    """Runs one data-parallel replica: `world_size` ranks connected by one channel set."""

    def __init__(self, config: EngineConfig, model_path: str, *, dp_rank: int = 0) -> None:
        self.config = config
        self.model_path = model_path
        self.dp_rank = dp_rank
        self.num_kv_blocks = 0
        self._channels: EngineChannels | None = None
        self._handles: dict[int, _Handle] = {}
        self._last_seen: dict[int, float] = {}
        self._ready: dict[int, int] = {}
        self._all_ready = anyio.Event()
        self._failure: WorkerFailure | None = None
        self._failed = anyio.Event()
        self._pending: dict[int, asyncio.Future[StepResult | None]] = {}
        self._errors: dict[int, WorkerError] = {}  # each rank's first WorkerError
        self._exited_at: dict[int, float] = {}  # when the monitor first saw a rank gone
        self._closed = False
        self._shutdown_lock = anyio.Lock()
        self._nodes: NodeServer | None = None
        self._ray: RayRanks | None = None

    # ----------------------------------------------------------------- start-up
    async def start(self, task_group: anyio.abc.TaskGroup) -> None:
        """Spawn the ranks and return once every one reported WorkerReady.

        A start that fails reaps what it started before raising (no rank, shm name or socket
        outlives it, whoever the caller is)."""
        try:
            await self._start(task_group)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.shutdown(grace=1.0)
            raise

    async def _start(self, task_group: anyio.abc.TaskGroup) -> None:
        cfg = self.config
        token = (cfg.tcp_token or os.urandom(16).hex()).encode()
        if cfg.distributed_executor_backend == "ray":
            await self._start_ray(task_group, token)
        else:
            await self._start_mp(task_group, token)
        task_group.start_soon(self._monitor_loop)
        assert self._channels is not None
        with anyio.move_on_after(cfg.worker_start_timeout) as scope:
            await self._until_failed(self._channels.wait_connected(float("inf")))
            task_group.start_soon(self._read_loop)
            await self._wait_either(self._all_ready)
        self._raise_if_failed()
        if scope.cancelled_caught:
            raise self._start_timeout()
        self.num_kv_blocks = min(self._ready.values())
        now = time.monotonic()
        self._last_seen = dict.fromkeys(self._handles, now)

    async def _start_mp(self, task_group: anyio.abc.TaskGroup, token: bytes) -> None:
        """This machine's ranks as worker processes, other nodes' through their agents."""
        cfg = self.config
        first_remote = cfg.node_ranks[0]
        remote = list(range(first_remote, cfg.world_size))
        channel_host = cfg.head_host if remote else "127.0.0.1"
        tls = _tls_config(cfg) if remote else None
        self._channels = await open_engine_channels(
            cfg.transport,
            cfg.world_size,
            host=channel_host,
            token=token if cfg.transport == "tcp" or remote else None,
            tcp_ranks=remote if cfg.transport == "shm" else (),
            tls=tls,
        )
        rendezvous = cfg.rendezvous_host
        init_method = f"tcp://{rendezvous}:{free_port(rendezvous)}"
        configs = {rank: self._worker_config(rank, init_method) for rank in range(cfg.world_size)}
        for rank in range(first_remote):
            self._handles[rank] = self._launch(rank, configs[rank])
        if remote:
            self._start_nodes(task_group, token, configs, tls)

    async def _start_ray(self, task_group: anyio.abc.TaskGroup, token: bytes) -> None:
        """Every rank as a Ray actor's worker program (`engine.ray_executor`): ranks on this
        process's Ray node attach over shm, the others over TCP with the token handed to their
        actor; torch.distributed meets at rank 0's node."""
        from shardline.engine.ray_executor import RayRanks

        cfg = self.config
        self._ray = RayRanks(
            cfg.world_size, self.dp_rank, num_cpus=cfg.num_threads or 1,
            num_gpus=1 if cfg.device.startswith("cuda") else 0,
            tp_size=cfg.tensor_parallel_size,
        )
        try:
            await self._ray.place(cfg.ray_address, cfg.worker_start_timeout)
        except (TimeoutError, ConnectionError) as exc:
            raise WorkerFailure(None, str(exc)) from exc
        remote = self._ray.remote_ranks if cfg.transport == "shm" else list(range(cfg.world_size))
        self._channels = await open_engine_channels(
            cfg.transport,
            cfg.world_size,
            host=self._ray.engine_ip if remote else "127.0.0.1",
            token=token if remote else None,
            tcp_ranks=remote if cfg.transport == "shm" else (),
        )
        init_method = await self._ray.rendezvous()
        for rank in range(cfg.world_size):
            # The token goes as its own argument of the actor's call, never inside the config.
            config = self._worker_config(rank, init_method)
            config["channels_address"] = without_tcp_secrets(config["channels_address"])
            handle = await self._ray.start(rank, config, token.decode() if remote else None)
            self._handles[rank] = handle
            task_group.start_soon(handle.watch)

    def _start_nodes(
        self,
        task_group: anyio.abc.TaskGroup,
        token: bytes,
        configs: dict[int, dict[str, Any]],
        tls: TlsConfig | None,
    ) -> None:
        """Listen for the other nodes' agents; they get their ranks' configs when they call
        (without the token: each agent gives its ranks its own)."""
        cfg = self.config
        node_ranks: dict[int, list[int]] = {}
        first = cfg.node_ranks[0]
        for node, count in enumerate(cfg.node_ranks[1:], start=1):
            node_ranks[node] = list(range(first, first + count))
            first += count

        def fail(rank: int | None, reason: str) -> None:
            self._fail(WorkerFailure(rank, reason))

        try:
            self._nodes = NodeServer(node_ranks, token, fail, tls)
            self._nodes.listen(cfg.head_host, cfg.head_port)
        except (OSError, ValueError) as exc:  # ValueError: TLS files that do not load
            raise WorkerFailure(None, str(exc)) from exc
        for ranks in node_ranks.values():
            for rank in ranks:
                self._handles[rank] = _RemoteHandle(self._nodes, rank)
        by_node = {
            node: [
                {**configs[r], "channels_address": without_tcp_secrets(configs[r]["channels_address"])}
                for r in ranks
            ]
            for node, ranks in node_ranks.items()
        }
        task_group.start_soon(self._nodes.serve, by_node)

    def _start_timeout(self) -> WorkerFailure:
        """The start-up error: which nodes never called in, else which ranks are not ready."""
        timeout = self.config.worker_start_timeout
        if self._nodes is not None and self._nodes.missing():
            return WorkerFailure(None, self._nodes.missing_report(timeout))
        missing = sorted(set(range(self.config.world_size)) - set(self._ready))
        return WorkerFailure(None, f"ranks {missing} not ready after {timeout:.0f} s")

    async def _until_failed(self, connect: Any) -> None:
        """Await `connect` (the channels' wait_connected) unless the group fails first."""
        done = anyio.Event()

        async def run() -> None:
            try:
                await connect
            except TransportError as exc:
                self._fail(WorkerFailure(None, f"a worker could not attach: {exc}"))
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await self._wait_either(done)
            tg.cancel_scope.cancel()
        self._raise_if_failed()

    def _worker_config(self, rank: int, init_method: str) -> dict[str, Any]:
        from shardline.worker.config import WorkerConfig

        cfg = self.config
        assert self._channels is not None
        return WorkerConfig(
            rank=rank,
            world_size=cfg.world_size,
            tp_size=cfg.tensor_parallel_size,
            pp_size=cfg.pipeline_parallel_size,
            dp_rank=self.dp_rank,
            dp_size=cfg.data_parallel_size,
            channels_address=self._channels.address,
            dist_init_method=init_method,
            dist_backend=None,
            model_path=self.model_path,
            model_arch=cfg.model_arch,
            dtype=cfg.torch_dtype_name,
            device=cfg.device,
            block_size=cfg.block_size,
            num_kv_blocks=cfg.num_kv_blocks,
            kv_cache_memory_bytes=cfg.kv_cache_memory_bytes,
            kv_cache_dtype=KV_CACHE_DTYPES[cfg.kv_cache_dtype],
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_model_len=cfg.max_model_len,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_num_seqs=cfg.max_num_seqs,
            seed=cfg.seed,
            parent_pid=os.getpid(),
            heartbeat_interval=cfg.heartbeat_interval,
            num_threads=cfg.threads_per_worker,
            cuda_graphs=cfg.cuda_graphs,
            enable_expert_parallel=cfg.enable_expert_parallel,
            plugins=list(cfg.plugins),
            model_specs=ModelRegistry.specs(),
        ).to_dict()

    def _launch(self, rank: int, worker_config: dict[str, Any]) -> _Handle:
        if self.config.transport == "inproc":
            from shardline.worker.main import Worker

            worker = Worker(worker_config)
            thread = threading.Thread(target=worker.run, name=f"shardline-worker-{rank}", daemon=True)
            thread.start()
            return _ThreadHandle(thread)
        process = launch_worker(worker_config)
        logger.debug("started rank %d (dp %d) as pid %d", rank, self.dp_rank, process.pid)
        return process

    @property
    def worker_pids(self) -> list[int]:
        """PIDs of worker processes (empty for the in-process worker; a Ray rank's pid is on
        its own node)."""
        return [pid for h in self._handles.values() if isinstance(pid := getattr(h, "pid", None), int)]

    # ----------------------------------------------------------------- steps
    async def execute(self, step: ExecuteStep) -> StepResult:
        """Run one step on every rank; return the output rank's result."""
        self._raise_if_failed()
        if self._closed or self._channels is None:
            raise EngineDeadError("executor is shut down")
        # Resolved by the reader with the result, or by `_fail` with None for every pending
        # step; awaited directly (one wake-up, no extra loop pass when it is already done).
        reply: asyncio.Future[StepResult | None] = asyncio.get_running_loop().create_future()
        self._pending[step.step_id] = reply
        try:
            try:
                await self._channels.broadcast(step)
            except (TransportBroken, TransportClosed) as exc:
                self._fail(WorkerFailure(None, f"cannot send step: {exc}"))
            result = await reply
            self._raise_if_failed()
            if result is None:
                raise EngineDeadError("executor is shut down")
            return result
        finally:
            self._pending.pop(step.step_id, None)

    async def _wait_either(self, event: anyio.Event) -> None:
        """Wait for `event` or for a failure, whichever comes first."""
        if self._failed.is_set():
            return
        async with anyio.create_task_group() as tg:

            async def wait_and_cancel(e: anyio.Event) -> None:
                await e.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(wait_and_cancel, event)
            tg.start_soon(wait_and_cancel, self._failed)

    # ----------------------------------------------------------------- background
    async def _read_loop(self) -> None:
        assert self._channels is not None
        while True:
            try:
                rank, msg = await self._channels.recv()
            except (TransportBroken, TransportClosed) as exc:
                if self._closed:
                    return
                # Nothing more can arrive: a dead rank is the cause, without waiting for it.
                dead = self._dead_cause(time.monotonic(), grace=False)
                if dead is not None:
                    self._fail(WorkerFailure(*dead))
                else:
                    self._fail(WorkerFailure(None, f"channel broken: {exc}"))
                return
            self._on_message(rank, msg)

    def _on_message(self, rank: int, msg: Message) -> None:
        self._last_seen[rank] = time.monotonic()
        if isinstance(msg, StepResult):
            reply = self._pending.get(msg.step_id)
            if reply is not None and not reply.done():
                reply.set_result(msg)
        elif isinstance(msg, Heartbeat | Hello):
            pass
        elif isinstance(msg, WorkerReady):
            self._ready[msg.rank] = msg.num_kv_blocks
            logger.info("worker rank %d ready with %d KV blocks", msg.rank, msg.num_kv_blocks)
            if len(self._ready) == self.config.world_size:
                self._all_ready.set()
        elif isinstance(msg, WorkerError):
            logger.error("worker rank %d failed (%s): %s\n%s", msg.rank, msg.kind, msg.message, msg.traceback)
            self._errors.setdefault(msg.rank, msg)
            # A peer's death surfaces first as a collective error on the survivors: name the
            # rank that actually died (or, while a peer that exited with an error status may
            # still have its own report on the way, let the monitor decide after the grace).
            now = time.monotonic()
            dead = self._dead_cause(now, exclude=msg.rank)
            if dead is not None:
                self._fail(WorkerFailure(*dead))
            elif not any(self._gone(r) for r in self._handles if r != msg.rank):
                self._fail(WorkerFailure(msg.rank, _error_text(msg)))
        else:
            logger.warning("unexpected %s from rank %d", type(msg).__name__, rank)

    async def _monitor_loop(self) -> None:
        """Notice dead or silent workers even when no step is in flight."""
        while not self._closed:
            await anyio.sleep(_MONITOR_PERIOD)
            if self._closed:
                return
            now = time.monotonic()
            dead = self._dead_cause(now)
            if dead is not None:
                self._fail(WorkerFailure(*dead))
            if self._all_ready.is_set():
                for rank, handle in self._handles.items():
                    if handle.is_alive() and now - self._last_seen.get(rank, now) > self.config.worker_timeout:
                        self._fail(WorkerFailure(rank, f"no heartbeat for {self.config.worker_timeout:.1f} s"))
            if self._failure is not None:
                return

    def _gone(self, rank: int) -> bool:
        return not self._handles[rank].is_alive()

    def _dead_cause(
        self, now: float, *, exclude: int | None = None, grace: bool = True
    ) -> tuple[int, str] | None:
        """(rank, reason) for a rank that is gone, or None: none is, or every one that is may
        still have its own WorkerError on the way (`grace`). A rank killed by a signal wins."""
        causes: list[tuple[bool, int, str]] = []
        for rank, handle in self._handles.items():
            if rank == exclude or handle.is_alive():
                continue
            killed, reason = self._exit_reason(rank, handle)
            error = self._errors.get(rank)
            if not killed and error is not None:
                reason = _error_text(error)  # its own report: what the caller should read
            elif not killed and grace:
                first = self._exited_at.setdefault(rank, now)
                if now - first < _EXIT_GRACE:
                    continue
            causes.append((not killed, rank, reason))
        if not causes:
            return None
        _, rank, reason = min(causes)
        return rank, reason

    def _exit_reason(self, rank: int, handle: _Handle) -> tuple[bool, str]:
        """(killed by a signal, how the gone rank ended) as far as this process can tell."""
        if isinstance(handle, WorkerProcess):
            code = handle.returncode
            return code is not None and code < 0, describe_exit(code)
        if isinstance(handle, _RemoteHandle):
            return handle.nodes.exit_reason(rank)
        ray_reason = getattr(handle, "exit_reason", None)  # a Ray rank (engine.ray_executor)
        if ray_reason is not None:
            return ray_reason()  # type: ignore[no-any-return]
        return False, "worker thread exited"

    def _fail(self, failure: WorkerFailure) -> None:
        if self._failure is None and not self._closed:
            self._failure = failure
            logger.error("%s", failure)
        self._failed.set()
        for reply in self._pending.values():
            if not reply.done():
                reply.set_result(None)

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure

    @property
    def failure(self) -> WorkerFailure | None:
        """Why the worker group failed, or None while it is healthy."""
        return self._failure

    async def wait_failed(self) -> None:
        """Return once the worker group has failed."""
        await self._failed.wait()

    # ----------------------------------------------------------------- shutdown
    async def shutdown(self, grace: float = 5.0) -> None:
        """Ask every rank to stop, wait, then terminate and kill. Idempotent."""
        async with self._shutdown_lock:
            if self._closed:
                return
            self._closed = True
            with anyio.CancelScope(shield=True):
                if self._channels is not None and self._failure is None:
                    with anyio.move_on_after(1.0):
                        try:
                            await self._channels.broadcast(Shutdown())
                        except (TransportBroken, TransportClosed):
                            pass
                if self._nodes is not None:
                    await self._nodes.aclose(stop_agents=self._failure is None, grace=grace)
                if self._ray is not None:
                    await self._ray.aclose(grace)
                await anyio.to_thread.run_sync(_reap, list(self._handles.values()), grace)
                if self._channels is not None:
                    await self._channels.aclose()


def _tls_config(cfg: EngineConfig) -> TlsConfig | None:
    """The head's TLS files for node links, or None."""
    if not cfg.tls_certfile:
        return None
    assert cfg.tls_keyfile and cfg.tls_ca_certs  # EngineConfig checks all-or-none
    return TlsConfig(cfg.tls_certfile, cfg.tls_keyfile, cfg.tls_ca_certs)


def _error_text(error: WorkerError) -> str:
    return f"{error.kind}: {error.message}"


def _reap(handles: list[_Handle], grace: float) -> None:
    """Join every rank within `grace` seconds, then terminate, then kill (blocking)."""
    deadline = time.monotonic() + grace
    for handle in handles:
        if isinstance(handle, _ThreadHandle):
            handle.thread.join(max(0.0, deadline - time.monotonic()))
    processes = [h for h in handles if isinstance(h, WorkerProcess)]
    reap_workers(processes, max(0.0, deadline - time.monotonic()))
