"""CPU tensors that Linux is asked to back with transparent huge pages.

A decode step streams every weight (the packed copies of `model.packed_linear`) and every
running sequence's KV blocks once. With 4 KiB pages those streams miss the TLB all the time:
2 MiB pages made the decode GEMMs 3-9% faster at 1-32 rows and decode attention 15-20% faster
(x64 at context 120) on a 2-core VM (benchmarks/RESULTS.md section 12).

The memory is a private anonymous mapping, zero-filled, advised `MADV_HUGEPAGE` before
anything touches it, which works where THP is `madvise` or `always`. Elsewhere (THP off, not
Linux) it is ordinary zeroed memory.

By default its pages are committed on first touch. `populate=True` commits them all at once
with `MADV_POPULATE_WRITE` (Linux 5.14+). That is for the CPU KV cache, whose pages would
otherwise fault in as sequences grow, inside the steps: on a 2-vCPU VM a first touch cost
~1.7 ms per 2 MiB from user space (0.6 GB/s), and a 64-prompt run faulted in ~600 MB of KV,
~1 s of a 13 s run (benchmarks/RESULTS.md section 12). Populating all of a 4 GiB cache took
0.6-8.8 s there, the most when the hypervisor had to back the memory afresh. It also reserves
the memory up front, so a machine short of RAM fails at start-up, not mid-request. Where the
kernel lacks the advice, pages stay lazy.

A large mapping is populated by several threads at once, each advising its own run of huge
pages (libc's madvise through ctypes, which lets go of the GIL): where the hypervisor backs the
memory afresh, each first touch exits to it, and those exits proceed in parallel. On the 2-vCPU
VM, 30 layers' 4 GiB took 6.5 s with 2 threads against 11.1 s with one (fresh memory; 0.4
against 0.7 s once the host had backed it).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import mmap
import os
import threading
from collections.abc import Callable

import torch

HUGE_PAGE = 2 << 20
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # <linux/mman.h>, Linux 5.14
POPULATE_PART_MIN = 32 << 20  # bytes a populating thread gets at least
POPULATE_THREADS_MAX = 8


def populate_parts(nbytes: int, parts: int) -> list[tuple[int, int]]:
    """`[start, end)` byte runs that cover `[0, nbytes)` in order, at most `parts` of them, each
    starting on a 2 MiB boundary (so no huge page is split between two threads)."""
    parts = max(1, min(parts, -(-nbytes // HUGE_PAGE)))
    bounds = [nbytes * i // parts // HUGE_PAGE * HUGE_PAGE for i in range(parts)] + [nbytes]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


@functools.cache
def _libc_madvise() -> Callable[[int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def _populate_threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, POPULATE_THREADS_MAX))


def _populate(mapping: mmap.mmap, base: int, offset: int, nbytes: int) -> None:
    """`MADV_POPULATE_WRITE` over `[offset, offset + nbytes)` of `mapping` (at address `base`),
    split over threads when it is large; OSError (errno of the first failure) if any part fails."""
    madvise = _libc_madvise()
    parts = populate_parts(nbytes, min(_populate_threads(), nbytes // POPULATE_PART_MIN))
    if madvise is None or len(parts) == 1:
        mapping.madvise(MADV_POPULATE_WRITE, offset, nbytes)
        return
    errors: list[int] = []

    def run(start: int, end: int) -> None:
        if madvise(base + offset + start, end - start, MADV_POPULATE_WRITE) != 0:
            errors.append(ctypes.get_errno())

    threads = [threading.Thread(target=run, args=part, name="shardline-populate") for part in parts[1:]]
    for thread in threads:
        thread.start()
    run(*parts[0])
    for thread in threads:
        thread.join()
    if errors:
        raise OSError(errors[0], os.strerror(errors[0]))


def huge_page_zeros(
    shape: int | tuple[int, ...], dtype: torch.dtype = torch.float32, *, populate: bool = False
) -> torch.Tensor:
    """A zeroed, contiguous CPU tensor starting on a 2 MiB boundary, in memory advised for huge
    pages. The tensor keeps its mapping alive. `populate`: commit every page now (see the
    module's docstring; a kernel without the advice leaves them lazy)."""
    if isinstance(shape, int):
        shape = (shape,)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    nbytes = math.prod(shape) * itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=flags) if flags else mmap.mmap(-1, nbytes + HUGE_PAGE)
    if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # THP unsupported by this kernel: ordinary pages
            pass
    raw = torch.frombuffer(mapping, dtype=torch.uint8)
    skip = -raw.data_ptr() % HUGE_PAGE
    if populate and hasattr(mapping, "madvise"):
        try:
            _populate(mapping, raw.data_ptr(), skip, nbytes)
        except OSError:  # EINVAL before Linux 5.14: pages fault in on first touch instead
            pass
    return raw[skip : skip + nbytes].view(dtype).view(shape)


def _idle_priority() -> None:
    """Run the calling thread only when a core is otherwise idle (Linux SCHED_IDLE), so that
    background page commits never take a core from the steps being served."""
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread, on Linux


def populate_in_background(tensors: list[torch.Tensor], name: str = "shardline-populate") -> threading.Thread | None:
    """Commit the pages of `tensors` (each from `huge_page_zeros`) on one background thread,
    64 MiB at a time, so that a caller can serve while its KV cache is committed (a page a step
    touches first is simply faulted in by that step). The thread runs at SCHED_IDLE: only on
    a core nothing else wants, never beside a step (committing 1.1 GB of huge pages takes ~2 s
    of a core on a 2-core VM). Returns the thread, or None where the
    kernel has no MADV_POPULATE_WRITE to offer (the pages then stay lazy)."""
    madvise = _libc_madvise()
    if madvise is None or not tensors:
        return None
    chunk = 64 << 20
    page = mmap.PAGESIZE

    def run() -> None:
        _idle_priority()
        for t in tensors:
            start = t.data_ptr() // page * page
            end = t.data_ptr() + t.numel() * t.element_size()
            for a in range(start, end, chunk):
                if madvise(a, min(chunk, end - a), MADV_POPULATE_WRITE) != 0:
                    return  # EINVAL before Linux 5.14, or the tensors are gone: stay lazy

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
