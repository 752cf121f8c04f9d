"""Opt-in timing of a worker's communication and steps, for benchmarks.

Set `SHARDLINE_PROFILE_DIR` in the engine's environment (spawned workers inherit it): each
worker then adds up the seconds spent in tensor-parallel collectives, pipeline sends and
receives, and whole steps, and writes them to `<dir>/rank<r>_<pid>.json` when it shuts down.
Unset, `timed` costs one dictionary lookup and nothing is written.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

_DIR = os.environ.get("SHARDLINE_PROFILE_DIR")
_totals: defaultdict[str, float] = defaultdict(float)
_counts: defaultdict[str, int] = defaultdict(int)


def enabled() -> bool:
    """True when this process records timings."""
    return _DIR is not None


@contextmanager
def timed(name: str) -> Iterator[None]:
    """Add the wall time of the block to the `name` total (when profiling is on)."""
    if _DIR is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        _totals[name] += time.perf_counter() - start
        _counts[name] += 1


def dump(rank: int) -> None:
    """Write this process's totals (no-op unless profiling is on)."""
    if _DIR is None:
        return
    directory = pathlib.Path(_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    record = {"rank": rank, "pid": os.getpid(), "seconds": dict(_totals), "counts": dict(_counts)}
    (directory / f"rank{rank}_{os.getpid()}.json").write_text(json.dumps(record))
