"""A shared-memory ring: one writer, N readers, fixed slots, POSIX named semaphores.

One POSIX shared-memory segment holds a header and ``nslots`` slots. Every header field is a
native u64 (aligned 8-byte loads/stores, so a reader never sees a torn value)::

    offset (u64 words)      field            written by   meaning
    ---------------------   --------------   ----------   ------------------------------------
    0                       magic            creator      "SHRDLN01"
    1 / 2 / 3               nslots / slot_size / nreaders (fixed at creation)
    4                       creator_pid      creator      owner; unlinks the names
    5                       writer_pid       writer       0 until the writer attaches
    6                       writer_state     writer       0 unattached, 1 attached, 2 closed
    7                       write_seq        writer       slots published so far (monotonic)
    8 + 8*i + 0             read_seq[i]      reader i     slots reader i consumed (monotonic)
    8 + 8*i + 1             pid[i]           reader i     0 until reader i attaches
    8 + 8*i + 2             state[i]         reader i     0 unattached, 1 attached, 2 closed
    slot k at header_size + k*stride:  [u64 total message length (first chunk only)][data...]

A message of L bytes takes ``max(1, ceil(L / slot_size))`` consecutive slots; slot ``s`` of the
stream lives at index ``s % nslots``. Two counting semaphores per reader carry both the
wake-ups and the memory ordering (post = release, wait = acquire):

    semaphore      value means                          writer              reader i
    ------------   ---------------------------------    -----------------   ----------------
    space[i]       slots reader i has freed (init N)    wait before a slot  post after a slot
    data[i]        slots published, unread by i         post after a slot   wait before a slot

State machine of one slot as seen by reader i::

    FREE --writer waits space[i] for every i, copies chunk, write_seq += 1, posts data[i]-->
    PUBLISHED --reader i waits data[i], copies chunk, read_seq[i] += 1, posts space[i]-->
    FREE (for i; the writer reuses the slot only when every reader has freed it)

Waiting: spin on the header sequence numbers for a few microseconds, then block on the
semaphore in ``POLL_INTERVAL`` slices; between slices check the peer's state word and pid
(a SIGKILLed peer is reported as ``TransportBroken`` within ~0.1 s). Closing an end sets its
state to closed and posts the peer's semaphores once to wake it. Names are
``/shardline_<creator pid>_<random>`` (+ ``_d<i>``/``_s<i>`` for semaphores), mode 0600; the
creator unlinks them on close and in a ``weakref.finalize``; a process that outlives a killed
creator can unlink them by address (:func:`ring_names`); :func:`sweep_stale` removes names
whose creator pid no longer exists.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import posix_ipc
import psutil

from shardline.transport.errors import TransportBroken, TransportClosed, TransportError

NAME_PREFIX = "shardline_"
MAGIC = int.from_bytes(b"SHRDLN01", "little")
POLL_INTERVAL = 0.1
# Spinning only pays when the peer has a core of its own: on a 2-core box shared with other
# processes a spinning waiter steals the CPU its peer needs (measured: 100 us of spin made a
# 64 B round trip ~6x slower there), so spin just a few microseconds unless cores are plenty.
SPIN_SECONDS = 50e-6 if (os.cpu_count() or 1) > 4 else 3e-6
UNATTACHED, ATTACHED, CLOSED = 0, 1, 2
_NSLOTS, _SLOT_SIZE, _NREADERS, _CREATOR, _WPID, _WSTATE, _WSEQ = range(1, 8)
_READER_BASE, _READER_WORDS = 8, 8
_RSEQ, _RPID, _RSTATE = 0, 1, 2
_SLOT_HEADER = 8


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as dead)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def new_base_name() -> str:
    """A fresh name ``/shardline_<our pid>_<random>`` that :func:`sweep_stale` recognises.

    Callers append ``_seg`` for the shared-memory segment and any other suffix for a
    semaphore (:func:`unlink_names` tells them apart by that).
    """
    return f"/{NAME_PREFIX}{os.getpid()}_{secrets.token_hex(6)}"


def sweep_stale() -> list[str]:
    """Unlink shared-memory names of this library whose creator process is gone and that
    belong to this user (another user's entries are theirs to clean, even for root)."""
    removed = []
    pattern = re.compile(r"^(sem\.)?" + NAME_PREFIX + r"(\d+)_")
    uid = os.geteuid()
    with contextlib.suppress(OSError):
        for entry in os.listdir("/dev/shm"):
            match = pattern.match(entry)
            if match and not psutil.pid_exists(int(match.group(2))) and _owned_by(entry, uid):
                with contextlib.suppress(OSError, posix_ipc.Error):
                    if match.group(1):
                        posix_ipc.unlink_semaphore("/" + entry[len("sem.") :])
                    else:
                        posix_ipc.unlink_shared_memory("/" + entry)
                    removed.append(entry)
    return removed


def _owned_by(entry: str, uid: int) -> bool:
    try:
        return os.stat(os.path.join("/dev/shm", entry)).st_uid == uid
    except OSError:
        return False


class _Handles:
    """The OS resources of one attached ring; released once nobody is using them."""

    def __init__(self, memory: mmap.mmap, nreaders: int, header_size: int) -> None:
        self.memory = memory
        self.header = memoryview(memory)[:header_size].cast("Q")
        self.view = memoryview(memory)
        self.data_sems: list[posix_ipc.Semaphore] = []
        self.space_sems: list[posix_ipc.Semaphore] = []
        self.lock = threading.Lock()
        self.users = 0
        self.closing = False

    def __enter__(self) -> _Handles:
        with self.lock:
            if self.closing:
                raise TransportClosed("this shm ring end is closed")
            self.users += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self.lock:
            self.users -= 1
            last = self.closing and self.users == 0
        if last:
            self._release_now()

    def release(self) -> None:
        with self.lock:
            self.closing = True
            if self.users:
                return  # the last user releases (see Ring.using)
        self._release_now()

    def _release_now(self) -> None:
        self.header.release()
        self.view.release()
        self.memory.close()
        for sem in self.data_sems + self.space_sems:
            with contextlib.suppress(posix_ipc.Error):
                sem.close()


def unlink_names(names: list[str]) -> None:
    """Unlink each name (``..._seg``: a segment, else a semaphore), ignoring missing ones."""
    for name in names:
        with contextlib.suppress(posix_ipc.Error, OSError):
            if name.endswith(("_seg",)):
                posix_ipc.unlink_shared_memory(name)
            else:
                posix_ipc.unlink_semaphore(name)


def ring_names(address: dict[str, Any]) -> list[str]:
    """Every name of the ring at `address` (a :attr:`Ring.address`): its segment and each
    reader's two semaphores, as :func:`unlink_names` takes them. For a process that knows a
    ring by its address and must unlink it because the creator died (a worker's engine)."""
    base, nreaders = str(address["name"]), int(address["nreaders"])
    return [base + "_seg"] + [f"{base}_{kind}{i}" for i in range(nreaders) for kind in "ds"]


def map_segment(base: str, size: int, *, create: bool) -> mmap.mmap:
    """Create (exclusively, mode 0600) or open the segment ``base + "_seg"``; map `size` bytes.

    Raises TransportBroken when it cannot be opened or mapped or is smaller than `size`; a
    segment this call created is unlinked again when mapping it fails.
    """
    name = base + "_seg"
    try:
        segment = posix_ipc.SharedMemory(
            name, posix_ipc.O_CREX if create else 0, 0o600, size=size if create else 0
        )
    except posix_ipc.Error as exc:
        raise TransportBroken(f"cannot open shm segment {base}: {exc}") from exc
    try:
        if segment.size < size:
            raise TransportBroken(f"shm segment {base} is smaller than its geometry")
        return mmap.mmap(segment.fd, size)
    except BaseException as exc:
        if create:
            unlink_names([name])
        if isinstance(exc, OSError):
            raise TransportBroken(f"cannot map shm segment {base}: {exc}") from exc
        raise
    finally:
        segment.close_fd()


class Ring:
    """One attached ring segment. Use :meth:`create` (owner) or :meth:`attach` (by address)."""

    def __init__(self, address: dict[str, Any], *, create: bool) -> None:
        self.base = str(address["name"])
        self.nslots = int(address["nslots"])
        self.slot_size = int(address["slot_size"])
        self.nreaders = int(address["nreaders"])
        if self.nslots < 1 or self.slot_size < 1 or self.nreaders < 1:
            raise ValueError(f"bad ring geometry {address!r}")
        self.header_size = 64 * (1 + self.nreaders) + 64
        self.stride = (_SLOT_HEADER + self.slot_size + 63) // 64 * 64
        size = self.header_size + self.nslots * self.stride
        flags = posix_ipc.O_CREX if create else 0
        memory = map_segment(self.base, size, create=create)
        self._handles = _Handles(memory, self.nreaders, self.header_size)
        self._names = [self.base + "_seg"]
        if create:  # registered before anything else can fail, so names never outlive us
            self._finalizer = weakref.finalize(self, _cleanup, self._handles, self._names)
        try:
            for i in range(self.nreaders):
                for kind, sems, initial in (
                    ("d", self._handles.data_sems, 0),
                    ("s", self._handles.space_sems, self.nslots),
                ):
                    name = f"{self.base}_{kind}{i}"
                    if create:
                        self._names.append(name)
                    sems.append(posix_ipc.Semaphore(name, flags, 0o600, initial))
        except posix_ipc.Error as exc:
            if not create:
                self._handles.release()
            else:
                self._finalizer()
            raise TransportBroken(f"cannot open shm semaphores of {self.base}: {exc}") from exc
        if not create:
            self._finalizer = weakref.finalize(self, _cleanup, self._handles, [])
        header = self.header
        if create:
            header[_NSLOTS], header[_SLOT_SIZE], header[_NREADERS] = (
                self.nslots,
                self.slot_size,
                self.nreaders,
            )
            header[_CREATOR] = os.getpid()
            header[0] = MAGIC
        elif header[0] != MAGIC or (header[_NSLOTS], header[_SLOT_SIZE], header[_NREADERS]) != (
            self.nslots,
            self.slot_size,
            self.nreaders,
        ):
            self.close()
            raise TransportBroken(f"shm segment {self.base} does not match its address")

    @classmethod
    def create(cls, nslots: int, slot_size: int, nreaders: int) -> Ring:
        """A new ring owned by this process (sweeping stale names of dead owners first)."""
        sweep_stale()
        name = new_base_name()
        return cls(
            {"name": name, "nslots": nslots, "slot_size": slot_size, "nreaders": nreaders},
            create=True,
        )

    @classmethod
    def attach(cls, address: dict[str, Any]) -> Ring:
        """Open an existing ring from its :attr:`address`."""
        try:
            return cls(address, create=False)
        except (KeyError, TypeError, ValueError) as exc:
            raise TransportBroken(f"bad shm ring address {address!r}: {exc}") from exc

    @property
    def address(self) -> dict[str, Any]:
        """What another process needs to :meth:`attach` (msgpack/pickle-able)."""
        return {
            "name": self.base,
            "nslots": self.nslots,
            "slot_size": self.slot_size,
            "nreaders": self.nreaders,
        }

    @property
    def header(self) -> memoryview:
        return self._handles.header

    def using(self) -> _Handles:
        """Hold the OS handles open for a (possibly blocking) operation: ``with ring.using()``.

        Raises TransportClosed on entry once this end is closed.
        """
        return self._handles

    def wait(
        self,
        sem: posix_ipc.Semaphore,
        ready: Callable[[], bool],
        check: Callable[[], None],
        deadline: float | None = None,
        spin: float = SPIN_SECONDS,
    ) -> None:
        """Take one unit of `sem` (see :func:`wait_semaphore`)."""
        wait_semaphore(sem, ready, check, deadline, spin, self.base)

    def close(self) -> None:
        """Release this process's handles; the creator also unlinks every name."""
        self._finalizer()


def wait_semaphore(
    sem: posix_ipc.Semaphore,
    ready: Callable[[], bool],
    check: Callable[[], None],
    deadline: float | None = None,
    spin: float = SPIN_SECONDS,
    name: str = "",
) -> None:
    """Take one unit of `sem`: spin while `ready()` is false, then block in slices.

    Between slices `check()` raises if the peer is gone or this end closed, unless `ready()`
    holds once it has looked (the peer's last frames before its close are still delivered; the
    call then returns without a unit); a deadline that passes raises TimeoutError; a failing
    semaphore raises TransportBroken naming `name`.
    """
    if ready():
        try:  # the common case: the unit is there (sem_trywait, no syscall)
            sem.acquire(0)
            return
        except posix_ipc.BusyError:
            pass
    else:
        spin_until = time.perf_counter() + spin
        while not ready() and time.perf_counter() < spin_until:
            pass
    while True:
        slice_s = POLL_INTERVAL
        if deadline is not None:
            slice_s = min(slice_s, max(deadline - time.monotonic(), 0.0))
        try:
            sem.acquire(slice_s)
            return
        except posix_ipc.BusyError:
            try:
                check()
            except TransportError:
                # The peer published, then closed or died, between this slice's end and the
                # check (its state is read first, so what it published before is visible now):
                # that is still to be taken. Its unit is left: every later wait ends on the close.
                if ready():
                    return
                raise
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("nothing arrived before the timeout") from None
        except posix_ipc.Error as exc:
            raise TransportBroken(f"shm semaphore of {name} failed: {exc}") from exc


def _cleanup(handles: _Handles, names: list[str]) -> None:
    unlink_names(names)
    handles.release()


def peer_check(ring: Ring, pid_word: int, state_word: int, who: str) -> Callable[[], None]:
    """A `check` for `Ring.wait`: raise if the peer at these header words closed or died."""

    def check() -> None:
        with ring.using() as handles:
            state, pid = handles.header[state_word], handles.header[pid_word]
        if state == CLOSED:
            raise TransportClosed(f"the {who} closed shm ring {ring.base}")
        if pid and not process_alive(pid):
            raise TransportBroken(f"the {who} (pid {pid}) of shm ring {ring.base} died")

    return check


def reader_words(index: int) -> tuple[int, int, int]:
    """Header word indices (read_seq, pid, state) of reader `index`."""
    base = _READER_BASE + _READER_WORDS * index
    return base + _RSEQ, base + _RPID, base + _RSTATE


WRITER_PID, WRITER_STATE, WRITE_SEQ, SLOT_HEADER = _WPID, _WSTATE, _WSEQ, _SLOT_HEADER
