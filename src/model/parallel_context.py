"""Where this process sits in the tensor/pipeline/data-parallel layout, and its process groups.

A worker calls `init_distributed(...)` once, after which every parallel layer takes what it
needs (rank, size, group, device) from the `ParallelContext` it is handed. Outside a worker
(tests, one process) `ParallelContext.single()` is rank 0 of size 1 and no collective runs.

Within one data-parallel replica the workers form one torch.distributed world of
`tp_size * pp_size` ranks, laid out as ``rank = pp_rank * tp_size + tp_rank``: the ranks of one
pipeline stage form a TP group, the ranks holding the same TP shard form a PP group. With expert
parallelism the expert-parallel (EP) group is the TP group: a MoE layer's experts are spread
over the ranks of the stage instead of each expert's weights being split (`model/moe.py`).

Rendezvous: for a ``tcp://HOST:PORT`` init method, rank 0 runs torch.distributed's TCPStore
on a socket it binds to HOST itself (`rendezvous_store`), so the store listens on that address
only; torch's own `init_method` path binds it to every interface (``*:PORT``), whatever HOST
says. The store has no authentication of its own: see docs/SECURITY.md.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from shardline.model.parallel.shm_comm import ShmCommunicator

ProcessGroup = Any  # torch.distributed.ProcessGroup; kept loose so the class is importable anywhere


@dataclass(frozen=True)
class ParallelContext:
    """This rank's coordinates and the groups its collectives run over (frozen)."""

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    tp_group: ProcessGroup | None = None
    pp_group: ProcessGroup | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # What carries the TP collectives: "shm" (then `tp_comm` is the shared-memory
    # communicator, see model.parallel.shm_comm), torch.distributed's backend name
    # ("gloo", "nccl"), or "none" for a group of one.
    tp_comm_backend: str = "none"
    tp_comm: ShmCommunicator | None = field(default=None, compare=False, repr=False)
    # Expert parallelism: this rank's place in the EP group (the TP group when enabled).
    ep_rank: int = 0
    ep_size: int = 1
    ep_group: ProcessGroup | None = None

    def __post_init__(self) -> None:
        for name, rank, size in (
            ("tp", self.tp_rank, self.tp_size),
            ("pp", self.pp_rank, self.pp_size),
            ("dp", self.dp_rank, self.dp_size),
            ("ep", self.ep_rank, self.ep_size),
        ):
            if size < 1 or not 0 <= rank < size:
                raise ValueError(f"{name}_rank={rank} is not a rank of {name}_size={size}")

    @classmethod
    def single(cls, device: torch.device | str | None = None) -> ParallelContext:
        """Rank 0 of size 1 in every dimension: one process holding the whole model."""
        return cls(device=torch.device(device) if device is not None else torch.device("cpu"))

    # The seed-style getters, for users' own Megatron-style layers.
    def get_tensor_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_parallel_world_size(self) -> int:
        return self.tp_size

    def get_pipeline_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_parallel_world_size(self) -> int:
        return self.pp_size

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_size(self) -> int:
        return self.dp_size

    def get_expert_parallel_rank(self) -> int:
        return self.ep_rank

    def get_expert_parallel_world_size(self) -> int:
        return self.ep_size

    @property
    def is_first_pp_rank(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_rank(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def rendezvous_store(
    init_method: str, rank: int, world_size: int, timeout: timedelta
) -> Any | None:
    """torch.distributed's store for a ``tcp://HOST:PORT`` init method, listening on HOST only
    (rank 0 serves it, the others connect); None for any other init method (torch handles it).

    torch's TCPStore binds its server to every interface when it opens the port itself, so
    rank 0 binds the listening socket to HOST and hands torch the descriptor
    (`master_listen_fd`, served by torch's libuv backend)."""
    url = urlparse(init_method)
    if url.scheme != "tcp" or not url.hostname or url.port is None:
        return None
    host, port = url.hostname, url.port
    if rank != 0:
        return dist.TCPStore(host, port, world_size, False, timeout, use_libuv=True)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise RuntimeError(f"cannot bind the torch.distributed store to {host}:{port}: {exc}") from exc
    try:
        store = dist.TCPStore(
            host,
            port,
            world_size,
            True,
            timeout,
            master_listen_fd=listener.fileno(),
            use_libuv=True,
        )
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store's server owns the descriptor now
    return store


def init_distributed(
    *,
    rank: int,
    world_size: int,
    tp_size: int,
    pp_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    init_method: str,
    backend: str | None = None,
    device: torch.device | str = "cpu",
    timeout_s: float = 120.0,
    enable_expert_parallel: bool = False,
) -> ParallelContext:
    """Join this replica's torch.distributed world and build the TP and PP groups.

    `backend=None` picks NCCL for a CUDA device and gloo otherwise. Every rank of the world must
    call this with the same sizes; group creation is collective. On CPU, when every rank of a TP
    group is on this host, the group's collectives may go over shared memory instead
    (`SHARDLINE_TP_ALLREDUCE=auto|shm|gloo`, see `model.parallel.shm_comm.setup_tp_comm`).
    `enable_expert_parallel` makes each TP group the expert-parallel group as well.
    """
    if tp_size < 1 or pp_size < 1:
        raise ValueError(f"tp_size={tp_size} and pp_size={pp_size} must both be >= 1")
    if world_size != tp_size * pp_size:
        raise ValueError(
            f"world_size={world_size} must equal tp_size * pp_size = {tp_size} * {pp_size}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not a rank of world_size={world_size}")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process")
    timeout = timedelta(seconds=timeout_s)
    store = rendezvous_store(init_method, rank, world_size, timeout)
    if store is None:
        dist.init_process_group(
            backend=backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout
        )
    else:
        dist.init_process_group(
            backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout
        )
    tp_rank, pp_rank = rank % tp_size, rank // tp_size
    tp_group = pp_group = None
    # Every rank creates every group, in the same order, as new_group requires.
    for stage in range(pp_size):
        group = dist.new_group([stage * tp_size + t for t in range(tp_size)])
        if stage == pp_rank:
            tp_group = group
    for shard in range(tp_size):
        group = dist.new_group([p * tp_size + shard for p in range(pp_size)])
        if shard == tp_rank:
            pp_group = group
    from shardline.model.parallel.shm_comm import setup_tp_comm  # here: model.parallel imports us

    # Every TP group decides together; the stages' groups are disjoint, so they run side by side.
    tp_comm, tp_comm_backend = setup_tp_comm(tp_group, tp_rank, tp_size, device, timeout_s)
    return ParallelContext(
        tp_rank=tp_rank,
        tp_size=tp_size,
        pp_rank=pp_rank,
        pp_size=pp_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        tp_group=tp_group,
        pp_group=pp_group,
        device=device,
        tp_comm_backend=tp_comm_backend,
        tp_comm=tp_comm,
        ep_rank=tp_rank if enable_expert_parallel else 0,
        ep_size=tp_size if enable_expert_parallel else 1,
        ep_group=tp_group if enable_expert_parallel else None,
    )


def destroy_distributed() -> None:
    """Tear down every process group and shared-memory communicator of this process (idempotent)."""
    from shardline.model.parallel.shm_comm import close_all

    close_all()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
