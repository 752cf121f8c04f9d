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
"""

from __future__ import annotations

import math
import mmap

import torch

HUGE_PAGE = 2 << 20
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # <linux/mman.h>, Linux 5.14


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
            mapping.madvise(MADV_POPULATE_WRITE, skip, nbytes)
        except OSError:  # EINVAL before Linux 5.14: pages fault in on first touch instead
            pass
    return raw[skip : skip + nbytes].view(dtype).view(shape)
