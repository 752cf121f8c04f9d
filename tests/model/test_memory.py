"""Huge-page CPU tensors (model/memory.py): zeroed, aligned, alive as long as the tensor, and
backed by 2 MiB pages where the kernel's THP setting allows."""

from __future__ import annotations

import gc
import pathlib
import sys

import pytest
import torch

from shardline.model.memory import HUGE_PAGE, huge_page_zeros


def test_zeroed_aligned_and_of_the_asked_shape_and_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.int32):
        t = huge_page_zeros((3, 5, 7), dtype)
        assert t.shape == (3, 5, 7) and t.dtype == dtype and t.is_contiguous()
        assert t.data_ptr() % HUGE_PAGE == 0
        assert not t.any()
    assert huge_page_zeros((0, 4)).shape == (0, 4)


def test_the_tensor_keeps_its_memory_alive():
    t = huge_page_zeros((1 << 20,))
    gc.collect()  # nothing but the tensor refers to the mapping now
    t.fill_(3.0)
    assert float(t.sum()) == 3.0 * (1 << 20)
    view = t[10:20]
    del t
    gc.collect()
    view.fill_(1.0)
    assert float(view.sum()) == 10.0


def _thp_mode() -> str:
    try:
        text = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text.split("[", 1)[1].split("]", 1)[0]


@pytest.mark.skipif(not sys.platform.startswith("linux") or _thp_mode() not in ("madvise", "always"),
                    reason="transparent huge pages are off here")
def test_backed_by_huge_pages_once_touched():
    def huge_kib() -> int:
        for line in pathlib.Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
        return 0

    before = huge_kib()
    t = huge_page_zeros((64 << 20) // 4)  # 64 MiB
    t.fill_(1.0)
    # Most of it (the kernel may fall back to small pages when memory is fragmented).
    assert huge_kib() - before >= 32 << 10
    del t


def _rss_kib() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux's")
def test_populate_commits_the_pages_before_any_touch():
    import platform

    release = tuple(int(part) for part in platform.release().split(".")[:2] if part.isdigit())
    if release < (5, 14):
        pytest.skip("MADV_POPULATE_WRITE needs Linux 5.14")
    size = 64 << 20
    lazy = _rss_kib()
    t = huge_page_zeros(size // 4)
    assert _rss_kib() - lazy < (size >> 10) // 4  # nothing committed yet
    del t
    gc.collect()
    before = _rss_kib()
    t = huge_page_zeros(size // 4, populate=True)
    assert _rss_kib() - before >= (size >> 10) * 9 // 10  # committed without a touch
    assert t.data_ptr() % HUGE_PAGE == 0 and not t.any()
    del t


def test_populate_parts_cover_the_range_in_order_on_huge_page_boundaries():
    from shardline.model.memory import populate_parts

    for nbytes in (1, 100, HUGE_PAGE, HUGE_PAGE + 1, 5 * HUGE_PAGE, (143 << 20) + 4096):
        for parts in (1, 2, 3, 8):
            runs = populate_parts(nbytes, parts)
            assert 1 <= len(runs) <= parts
            assert runs[0][0] == 0 and runs[-1][1] == nbytes
            for (_, end), (start, _) in zip(runs, runs[1:], strict=False):
                assert end == start and start % HUGE_PAGE == 0
            assert all(end > start for start, end in runs)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux's")
def test_populate_split_over_threads_commits_every_part(monkeypatch):
    import platform

    from shardline.model import memory

    release = tuple(int(part) for part in platform.release().split(".")[:2] if part.isdigit())
    if release < (5, 14):
        pytest.skip("MADV_POPULATE_WRITE needs Linux 5.14")
    monkeypatch.setattr(memory, "_populate_threads", lambda: 3)
    monkeypatch.setattr(memory, "POPULATE_PART_MIN", 16 << 20)
    calls = []
    real = memory.populate_parts
    monkeypatch.setattr(memory, "populate_parts", lambda n, p: calls.append(real(n, p)) or calls[-1])
    size = 96 << 20
    before = _rss_kib()
    t = huge_page_zeros(size // 4, populate=True)
    assert len(calls) == 1 and len(calls[0]) == 3  # three threads, one run each
    assert _rss_kib() - before >= (size >> 10) * 9 // 10
    assert t.data_ptr() % HUGE_PAGE == 0 and not t.any()
    del t


def test_a_failed_populate_leaves_a_usable_lazy_tensor(monkeypatch):
    import ctypes
    import errno

    from shardline.model import memory

    def failing(address: int, length: int, advice: int) -> int:
        ctypes.set_errno(errno.EINVAL)  # what a kernel without the advice answers
        return -1

    monkeypatch.setattr(memory, "_libc_madvise", lambda: failing)
    monkeypatch.setattr(memory, "_populate_threads", lambda: 2)
    monkeypatch.setattr(memory, "POPULATE_PART_MIN", 16 << 20)
    t = huge_page_zeros((64 << 20) // 4, populate=True)
    assert not t.any()
    t.fill_(2.0)
    assert float(t[-1]) == 2.0
