"""Shared-memory all-reduce and all-gather between the ranks of one TP group on one CPU host.

Gloo on loopback costs 1-3 ms per collective at decode sizes; this costs a copy in, one
barrier and a sum. TP rank 0 creates one POSIX shared-memory segment and one named semaphore
per rank; the others attach by the address rank 0 broadcasts over the gloo group. Layout
(native u64 header words, then data)::

    word           field
    0              magic "SHRDTP01"
    1 / 2 / 3      world size / slot bytes / creator pid
    8*(1+r) + 0    pid of rank r (0 until it attaches)
    8*(1+r) + 1    rounds rank r has posted (monotonic; spun on briefly before blocking)
    data           buffer b in (0, 1), slot r at header_size + (b * n + r) * slot_bytes

A round is one collective, or one slot-sized chunk of a larger one. Round k uses buffer k % 2:
rank r copies its chunk into slot r, posts every peer's semaphore, takes n-1 units of its own,
then reads every slot (a sum over slots 0..n-1 in that order, so all ranks get the same bits).
One barrier per round is enough:

* No rank passes the barrier of round k before every rank has posted round k. The first rank
  to pass needs (n-1)(k+1) units; a rank that has not posted round k gave it at most k, and
  every other rank at most k+1 (a (k+2)-th post would mean it had passed round k first).
* So a rank that writes buffer k % 2 again, in round k+2, has passed the barrier of round k+1;
  every rank has posted round k+1, which each does only after it finished reading round k.

Names are ``/shardline_<creator pid>_<random>`` + ``_seg`` / ``_r<rank>`` (mode 0600), the
scheme :func:`transport.shm_ring.sweep_stale` recognises. Rank 0 unlinks them as soon as every
rank has attached (open mappings and semaphores stay valid), so a SIGKILLed rank leaves
nothing behind after set-up; a kill during set-up leaves names that the next sweep removes.
Close (at :func:`close_all`, from ``destroy_distributed``) or the finalizer unmaps the rest;
a worker whose engine vanished unlinks what is still named (:func:`unlink_all`).

:func:`setup_tp_comm` decides per TP group whether to use this or torch.distributed:
``SHARDLINE_TP_ALLREDUCE=auto|shm|gloo`` (default auto: time both, TP rank 0 decides). Ranks
may share memory when their :func:`host_key` is equal: the same kernel boot, the same /dev/shm
(filesystem and directory) and the same pid namespace (a peer's death is seen by its pid). A
network namespace is not part of it: ranks in separate network namespaces of one machine (as
the two "nodes" of tests/multinode, or containers with their own network but the host's
/dev/shm and pids) really do share /dev/shm, so they use it. ``SHARDLINE_HOST_ID``, where set,
is added to the key: ranks whose values differ are treated as on different hosts (gloo), which
is how tests/multinode runs the cross-host path on one machine.

The set-up exchanges (modes and host keys, rank 0's address, errors, the auto decision) are
msgpack bytes sent as uint8 tensors with torch.distributed's all_gather / broadcast, decoded
into the expected types; nothing is pickled (no ``*_object`` collectives).
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import pathlib
import socket
import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import posix_ipc
import torch
import torch.distributed as dist

from shardline.model.env import env_choice
from shardline.transport.errors import TransportBroken
from shardline.transport.shm_ring import (
    SPIN_SECONDS,
    map_segment,
    new_base_name,
    process_alive,
    sweep_stale,
    unlink_names,
    wait_semaphore,
)

logger = logging.getLogger("shardline.model.parallel")

ENV_MODE = "SHARDLINE_TP_ALLREDUCE"
ENV_HOST_ID = "SHARDLINE_HOST_ID"
MODES = ("auto", "shm", "gloo")
DEFAULT_SLOT_BYTES = 2 << 20  # per rank per buffer: TP=2 maps 8 MiB
MAGIC = int.from_bytes(b"SHRDTP01", "little")
_WORLD, _SLOT_BYTES, _CREATOR = 1, 2, 3
# Auto mode times both on a decode-sized activation (16 tokens x SmolLM2's hidden size).
PROBE_SHAPE = (16, 576)
PROBE_WARMUP, PROBE_ITERS = 3, 15

_live: weakref.WeakSet[ShmCommunicator] = weakref.WeakSet()


class _Resources:
    """The mapping, the semaphores and the slot views; released once, by close or finalizer."""

    def __init__(self, memory: mmap.mmap) -> None:
        self.memory = memory
        self.header = memoryview(memory).cast("Q")
        self.sems: list[posix_ipc.Semaphore] = []
        self.slots: list[list[torch.Tensor]] = []  # [buffer][rank] -> uint8 view
        self.typed: dict[torch.dtype, list[list[torch.Tensor]]] = {}
        self.names: list[str] = []  # unlinked by the creator on release
        self.closed = False

    def release(self) -> None:
        if self.closed:
            return
        self.closed = True
        unlink_names(self.names)
        self.names = []
        # The views point into the mapping without holding it: drop them before unmapping.
        self.slots, self.typed = [], {}
        self.header.release()
        self.memory.close()
        for sem in self.sems:
            with contextlib.suppress(posix_ipc.Error):
                sem.close()


class ShmCommunicator:
    """One rank's end of a TP group's shared-memory collectives (:meth:`create` / :meth:`attach`)."""

    def __init__(
        self, address: dict[str, Any], rank: int, *, create: bool, timeout_s: float = 120.0
    ) -> None:
        self.base = str(address["name"])
        self.world_size = int(address["world_size"])
        self.slot_bytes = int(address["slot_bytes"])
        if self.world_size < 2 or not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} of a shm group of {self.world_size} ranks")
        if self.slot_bytes < 64 or self.slot_bytes % 64:
            raise ValueError(f"slot_bytes={self.slot_bytes} must be a positive multiple of 64")
        self.rank = rank
        self.timeout_s = timeout_s
        n = self.world_size
        self.header_size = 64 * (1 + n)
        size = self.header_size + 2 * n * self.slot_bytes
        flags = posix_ipc.O_CREX if create else 0
        memory = map_segment(self.base, size, create=create)
        res = self._res = _Resources(memory)
        if create:  # registered first, so the names never outlive a failed set-up
            res.names = [self.base + "_seg"] + [f"{self.base}_r{r}" for r in range(n)]
        self._finalizer = weakref.finalize(self, res.release)
        try:
            for r in range(n):
                res.sems.append(posix_ipc.Semaphore(f"{self.base}_r{r}", flags, 0o600, 0))
            header = res.header
            geometry = (n, self.slot_bytes)
            if create:
                header[_WORLD], header[_SLOT_BYTES] = geometry
                header[_CREATOR] = os.getpid()
                header[0] = MAGIC
            elif header[0] != MAGIC or (header[_WORLD], header[_SLOT_BYTES]) != geometry:
                raise ValueError(f"shm segment {self.base} does not match its address")
            header[self._pid_word(rank)] = os.getpid()
        except BaseException:
            self.close()
            raise
        for b in range(2):
            res.slots.append([
                torch.frombuffer(memory, dtype=torch.uint8, count=self.slot_bytes,
                                 offset=self.header_size + (b * n + r) * self.slot_bytes)
                for r in range(n)
            ])  # fmt: skip
        self._round = 0
        self._peers = [r for r in range(n) if r != rank]
        self._peer_round_words = [self._pid_word(r) + 1 for r in self._peers]
        self._sem = res.sems[rank]
        _live.add(self)

    @classmethod
    def create(
        cls, world_size: int, slot_bytes: int = DEFAULT_SLOT_BYTES, timeout_s: float = 120.0
    ) -> ShmCommunicator:
        """Rank 0's end: new names owned by this process (stale names of dead owners swept first)."""
        sweep_stale()
        address = {"name": new_base_name(), "world_size": world_size, "slot_bytes": slot_bytes}
        return cls(address, 0, create=True, timeout_s=timeout_s)

    @classmethod
    def attach(
        cls, address: dict[str, Any], rank: int, timeout_s: float = 120.0
    ) -> ShmCommunicator:
        """Rank `rank`'s end of the group rank 0 created at `address`."""
        return cls(address, rank, create=False, timeout_s=timeout_s)

    @property
    def address(self) -> dict[str, Any]:
        """What the other ranks need to :meth:`attach` (msgpack-able)."""
        return {"name": self.base, "world_size": self.world_size, "slot_bytes": self.slot_bytes}

    @property
    def names(self) -> list[str]:
        """The names this end still has to unlink (the creator's, until :meth:`unlink`)."""
        return list(self._res.names)

    @property
    def closed(self) -> bool:
        return self._res.closed

    def unlink(self) -> None:
        """Remove the names now that every rank has attached (the creator's call; idempotent)."""
        unlink_names(self._res.names)
        self._res.names = []

    def close(self) -> None:
        """Unmap and close this end (and unlink any names still ours); idempotent."""
        _live.discard(self)
        self._finalizer()

    # ----------------------------------------------------------------- collectives
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the group, in place; every rank gets the same bits. Returns it."""
        flat = tensor.view(-1) if tensor.is_contiguous() else tensor.contiguous().view(-1)
        for start, stop, slots in self._rounds(flat):
            chunk = flat[start:stop]
            m = stop - start
            torch.add(slots[0][:m], slots[1][:m], out=chunk)
            for slot in slots[2:]:
                chunk.add_(slot[:m])
        if flat.data_ptr() != tensor.data_ptr():
            tensor.copy_(flat.view_as(tensor))
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's `tensor` concatenated along `dim`, in rank order."""
        n, shape = self.world_size, tensor.shape
        d = dim % tensor.dim()
        lead, inner = math.prod(shape[:d]), math.prod(shape[d:])
        out = tensor.new_empty((*shape[:d], n * shape[d], *shape[d + 1 :]))
        # Rank r's block of `out` is columns [r*inner, (r+1)*inner) of it seen as [lead, n*inner].
        blocks = out.view(lead, n, inner)
        if out.numel() == 0:  # the same on every rank: nothing to exchange
            return out
        flat = tensor.reshape(-1)
        if inner * tensor.element_size() <= self.slot_bytes:  # rounds of whole leading rows
            for start, stop, slots in self._rounds(flat, unit=inner):
                rows = slice(start // inner, stop // inner)
                for r, slot in enumerate(slots):
                    blocks[rows, r].copy_(slot[: stop - start].view(-1, inner))
            return out
        gathered = flat.new_empty((n, flat.numel()))  # a row larger than a slot: flat chunks
        for start, stop, slots in self._rounds(flat):
            for r, slot in enumerate(slots):
                gathered[r, start:stop].copy_(slot[: stop - start])
        blocks.copy_(gathered.view(n, lead, inner).transpose(0, 1))
        return out

    def _rounds(
        self, flat: torch.Tensor, unit: int = 1
    ) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
        """Per slot-sized chunk (a multiple of `unit` elements): copy it into our slot, barrier,
        yield (start, stop, every rank's slot). The same shapes give every rank the same rounds."""
        if self._res.closed:
            raise RuntimeError(f"shm communicator {self.base} is closed")
        typed = self._typed(flat.dtype)
        per_slot = self.slot_bytes // flat.element_size()
        per_slot -= per_slot % max(unit, 1)
        numel = flat.numel()
        for start in range(0, max(numel, 1), per_slot):
            stop = min(start + per_slot, numel)
            slots = typed[self._round % 2]
            slots[self.rank][: stop - start].copy_(flat[start:stop])
            self._barrier()
            yield start, stop, slots

    def _typed(self, dtype: torch.dtype) -> list[list[torch.Tensor]]:
        typed = self._res.typed.get(dtype)
        if typed is None:
            typed = [[slot.view(dtype) for slot in buf] for buf in self._res.slots]
            self._res.typed[dtype] = typed
        return typed

    def _barrier(self) -> None:
        self._round += 1
        header, sems = self._res.header, self._res.sems
        header[self._pid_word(self.rank) + 1] = self._round
        for peer in self._peers:
            sems[peer].release()
        deadline = time.monotonic() + self.timeout_s
        for _ in self._peers:
            wait_semaphore(self._sem, self._peers_posted, self._check_peers, deadline,
                           SPIN_SECONDS, self.base)  # fmt: skip

    def _peers_posted(self) -> bool:
        header, want = self._res.header, self._round
        return all(header[w] >= want for w in self._peer_round_words)

    def _check_peers(self) -> None:
        for peer in self._peers:
            pid = self._res.header[self._pid_word(peer)]
            if pid and not process_alive(pid):
                raise RuntimeError(f"TP rank {peer} (pid {pid}) of shm group {self.base} died")

    @staticmethod
    def _pid_word(rank: int) -> int:
        return 8 * (1 + rank)


def close_all() -> None:
    """Close every communicator of this process (``destroy_distributed`` calls this)."""
    for comm in list(_live):
        comm.close()


def unlink_all() -> None:
    """Unlink the names every communicator of this process still owns, mapping nothing away.

    For a worker whose engine is gone and that is about to exit (possibly from another thread
    while this one is inside a collective): only the names go, the mappings stay valid.
    """
    for comm in list(_live):
        comm.unlink()


# --------------------------------------------------------------------- choosing per TP group
def requested_mode() -> str:
    """`SHARDLINE_TP_ALLREDUCE` (auto, shm or gloo; default auto)."""
    return env_choice(ENV_MODE, MODES)


def setup_tp_comm(
    tp_group: Any,
    tp_rank: int,
    tp_size: int,
    device: torch.device,
    timeout_s: float = 120.0,
    slot_bytes: int = DEFAULT_SLOT_BYTES,
) -> tuple[ShmCommunicator | None, str]:
    """Build this TP group's shm communicator when it should carry the collectives.

    Collective over `tp_group`: every rank calls it. Returns (communicator or None, backend
    name: "shm", or torch.distributed's backend of the group). TP rank 0's
    `SHARDLINE_TP_ALLREDUCE` decides for the group; shm needs a CPU device and every TP rank on
    this host (one :func:`host_key`). In auto mode both are timed on a decode-sized tensor and
    TP rank 0 picks the faster; a forced ``shm`` that cannot be had raises on every rank.
    """
    fallback = str(dist.get_backend(tp_group))
    if tp_size == 1 or device.type != "cpu":
        if tp_size > 1 and requested_mode() == "shm":
            raise RuntimeError(f"{ENV_MODE}=shm needs a CPU device (this rank has {device})")
        return None, fallback
    seen = [
        _decode(raw, f"TP rank {r}'s mode and host", _check_mode_and_host)
        for r, raw in enumerate(_all_gather_bytes(_encode([requested_mode(), host_key()]), tp_group))
    ]
    mode = seen[0][0]
    if any(m != mode for m, _ in seen) and tp_rank == 0:
        logger.warning("TP ranks disagree on %s (%s); TP rank 0's %r decides",
                       ENV_MODE, [m for m, _ in seen], mode)  # fmt: skip
    hosts = {host for _, host in seen}
    if mode == "shm" and len(hosts) > 1:
        raise RuntimeError(f"{ENV_MODE}=shm needs every TP rank on one host, not {sorted(hosts)}")
    if len(hosts) > 1:
        logger.info("TP collectives over %s: the %d TP ranks are on %d hosts", fallback,
                    tp_size, len(hosts))  # fmt: skip
        return None, fallback
    if mode == "gloo":
        return None, fallback
    comm = _build(tp_group, tp_rank, tp_size, timeout_s, slot_bytes, required=mode == "shm")
    if comm is None:
        return None, fallback
    if mode == "shm":
        logger.info("TP collectives over shared memory (%s=shm)", ENV_MODE)
        return comm, "shm"
    use_shm, timings = _probe(comm, tp_group, tp_rank)
    logger.info("TP collectives over %s (auto: median %s %.3f ms, shm %.3f ms on %s)",
                "shared memory" if use_shm else fallback, fallback, timings[0] * 1e3,
                timings[1] * 1e3, list(PROBE_SHAPE))  # fmt: skip
    if use_shm:
        return comm, "shm"
    comm.close()
    return None, fallback


def host_key() -> str:
    """What ranks that can share POSIX shared memory have in common (see the module doc):
    the kernel's boot id, /dev/shm's device and inode, the pid namespace, and
    ``SHARDLINE_HOST_ID`` where set. The host name is not part of it (a container may have its
    own and still the host's /dev/shm); it stands in for the boot id only where that is
    unreadable."""
    boot = ""
    with contextlib.suppress(OSError):
        boot = pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    shm = pid_ns = ""
    with contextlib.suppress(OSError):
        info = os.stat("/dev/shm")
        shm = f"{info.st_dev}:{info.st_ino}"
    with contextlib.suppress(OSError):
        pid_ns = os.readlink("/proc/self/ns/pid")
    key = f"{boot or socket.gethostname()}/shm {shm}/{pid_ns}"
    host_id = os.environ.get(ENV_HOST_ID, "").strip()
    return f"{key}/id {host_id}" if host_id else key


# --------------------------------------------------------------------- typed set-up exchange
def _encode(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def _decode(raw: bytes, what: str, check: Callable[[Any], bool]) -> Any:
    """`raw` unpacked, if `check` accepts it; else a RuntimeError naming `what`."""
    try:
        value = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise RuntimeError(f"malformed {what} in the shm set-up: {exc}") from None
    if not check(value):
        raise RuntimeError(f"malformed {what} in the shm set-up: {value!r}")
    return value


def _check_mode_and_host(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and value[0] in MODES
            and isinstance(value[1], str))  # fmt: skip


def _check_address(value: Any) -> bool:
    return value is None or (
        isinstance(value, list) and len(value) == 3 and isinstance(value[0], str)
        and all(type(v) is int for v in value[1:])
    )  # fmt: skip


def _check_error(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _check_decision(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 3 and isinstance(value[0], bool)
            and all(isinstance(v, float) for v in value[1:]))  # fmt: skip


def _bytes_tensor(payload: bytes, size: int) -> torch.Tensor:
    tensor = torch.zeros(max(size, 1), dtype=torch.uint8)
    if payload:
        tensor[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return tensor


def _all_gather_bytes(payload: bytes, group: Any) -> list[bytes]:
    """Every rank's `payload`, in group rank order: the lengths (int64), then the bytes padded
    to the longest, both with torch.distributed's tensor all_gather."""
    n = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(n)]
    dist.all_gather(sizes, torch.tensor([len(payload)], dtype=torch.int64), group=group)
    lengths = [int(size.item()) for size in sizes]
    longest = max(lengths)
    parts = [torch.zeros(max(longest, 1), dtype=torch.uint8) for _ in range(n)]
    dist.all_gather(parts, _bytes_tensor(payload, longest), group=group)
    return [part[:length].numpy().tobytes() for part, length in zip(parts, lengths, strict=True)]


def _broadcast_bytes(payload: bytes | None, group: Any) -> bytes:
    """Group rank 0's `payload` (other ranks pass None): its length, then its bytes."""
    size = torch.tensor([len(payload or b"")], dtype=torch.int64)
    dist.broadcast(size, group=group, group_src=0)
    length = int(size.item())
    data = _bytes_tensor(payload or b"", length)
    dist.broadcast(data, group=group, group_src=0)
    return data[:length].numpy().tobytes()


def _build(
    tp_group: Any, tp_rank: int, tp_size: int, timeout_s: float, slot_bytes: int, required: bool
) -> ShmCommunicator | None:
    """Rank 0 creates, the others attach, rank 0 unlinks; None on every rank if any failed."""
    comm: ShmCommunicator | None = None
    error: str | None = None
    sent: list[Any] | None = None
    if tp_rank == 0:
        try:
            comm = ShmCommunicator.create(tp_size, slot_bytes, timeout_s)
            sent = [comm.base, comm.world_size, comm.slot_bytes]
        except (OSError, ValueError, posix_ipc.Error, TransportBroken) as exc:
            error = f"TP rank 0 could not create the shm segment: {exc}"
    raw = _broadcast_bytes(_encode(sent) if tp_rank == 0 else None, tp_group)
    got = _decode(raw, "address from TP rank 0", _check_address)
    if tp_rank != 0 and got is not None:
        address = {"name": got[0], "world_size": got[1], "slot_bytes": got[2]}
        try:
            comm = ShmCommunicator.attach(address, tp_rank, timeout_s)
        except (OSError, ValueError, posix_ipc.Error, TransportBroken) as exc:
            error = f"TP rank {tp_rank} could not attach shm segment {got[0]}: {exc}"
    errors = [  # also: every rank has attached
        _decode(raw, f"TP rank {r}'s set-up result", _check_error)
        for r, raw in enumerate(_all_gather_bytes(_encode(error), tp_group))
    ]
    if comm is not None:
        comm.unlink()
    failures = [e for e in errors if e]
    if not failures:
        return comm
    if comm is not None:
        comm.close()
    if required:
        raise RuntimeError(f"{ENV_MODE}=shm: " + "; ".join(failures))
    logger.warning("TP collectives stay on torch.distributed: %s", "; ".join(failures))
    return None


def _probe(comm: ShmCommunicator, tp_group: Any, tp_rank: int) -> tuple[bool, tuple[float, float]]:
    """Time both on PROBE_SHAPE; TP rank 0's medians decide, broadcast so all ranks agree."""
    tensor = torch.ones(PROBE_SHAPE)

    def median_s(op: Callable[[], object]) -> float:
        samples = []
        for i in range(PROBE_WARMUP + PROBE_ITERS):
            start = time.perf_counter()
            op()
            if i >= PROBE_WARMUP:
                samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    gloo_s = median_s(lambda: dist.all_reduce(tensor, group=tp_group))
    shm_s = median_s(lambda: comm.all_reduce(tensor))
    ours = _encode([shm_s < gloo_s, gloo_s, shm_s]) if tp_rank == 0 else None
    use_shm, gloo_s, shm_s = _decode(_broadcast_bytes(ours, tp_group), "decision of TP rank 0",
                                     _check_decision)  # fmt: skip
    return use_shm, (gloo_s, shm_s)
