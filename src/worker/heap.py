"""Keep a worker's freed activation memory mapped instead of handing it back to the kernel.

A forward allocates and frees the same large activations every step (a 2,048-token SmolLM2
step: ~80 MB per layer). glibc's defaults serve blocks above a dynamic threshold with fresh
`mmap`s and trim the heap's free top back to the kernel, so each step page-faults its
activations in again: 373k minor faults and 0.9 s of system time per 2,048-token step on a
2-core machine, a fifth of the step (benchmarks/RESULTS.md section 12). Raising the mmap
threshold to glibc's maximum (32 MiB on 64-bit) and the trim threshold to 1 GiB makes the
steady state fault-free; the cost is that the worker keeps its peak heap, as an engine that
pre-allocates activations would.

Once the worker has been idle for a while (`IdleTrim`: no message for the worker's receive
poll, a second) the peak heap of the last burst goes back to the kernel (`malloc_trim(0)`):
an idle server holds its weights and KV cache, not the activations of its longest prefill
(~200 MiB after a 2,048-token prompt of a Llama-3.2-1B-shaped model, benchmarks/RESULTS.md
section 29). The first steps of the next burst fault their activations in again.

Only spawned worker processes call this (never the caller's process, which owns its own
allocator policy), and not when the user set glibc malloc tunables themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD_BYTES = 1 << 30
_USER_TUNABLES = ("GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                  "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def retain_freed_memory() -> bool:
    """Set this process's glibc heap thresholds; True when they were set (glibc, no user
    tunables), False otherwise (musl, macOS, or the user's own settings win)."""
    if any(name in os.environ for name in _USER_TUNABLES):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the kernel now (`malloc_trim(0)`), e.g. once start-up
    let go of weights it no longer needs; the raised trim threshold would keep them otherwise.
    True where glibc did it."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    return bool(trim(0))


class IdleTrim:
    """`release_free_memory` once per idle period after work: `worked()` after each step,
    `idle()` when no message came for the receive poll; nothing when not `enabled` (the
    thresholds are the user's, or the worker runs in the caller's process)."""

    def __init__(self, enabled: bool, trim: Callable[[], bool] = release_free_memory) -> None:
        self.enabled, self._trim = enabled, trim
        self._pending = False

    def worked(self) -> None:
        self._pending = self.enabled

    def idle(self) -> None:
        if self._pending:
            self._pending = False
            self._trim()
