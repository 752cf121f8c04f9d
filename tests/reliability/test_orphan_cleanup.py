"""An engine SIGKILLed mid-life: its workers exit and remove its shared memory themselves.

The engine creates every shm ring of its channels and unlinks them on close; killed, it
cannot, and its workers are the only processes that still know the names. Each worker that
finds its parent gone unlinks them before exiting, so /dev/shm is clean at once, without
waiting for a later start's sweep (which may never come).
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import psutil
import pytest

from shardline.transport.channels import connect_worker_channels, open_engine_channels
from shardline.transport.shm_ring import Ring, ring_names
from support.leaks import our_shm_entries, owner_pid

ENGINE_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from shardline.engine import Engine, EngineConfig

    async def main():
        cfg = EngineConfig(model=sys.argv[1], transport="shm", tensor_parallel_size=int(sys.argv[2]),
                           max_model_len=128, num_kv_blocks=64)
        engine = await Engine.start(cfg)
        pids = [p for c in engine._cores for p in c.executor.worker_pids]
        print("PIDS", *pids, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)
HANG_GUARD_S = 120.0  # only a hang trips it; nothing here is a timing requirement


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _names_of(pids: set[int]) -> list[str]:
    return [n for n in our_shm_entries() if owner_pid(n) in pids]


def _wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: still not the case after {HANG_GUARD_S} s")
        time.sleep(0.05)


@pytest.mark.parametrize("tp", [1, 2])
def test_sigkilled_engine_leaves_nothing_in_dev_shm(tiny_llama_dir: pathlib.Path, tp: int) -> None:
    """TP=1: the broadcast ring and one result ring (2 segments, 4 semaphores); TP=2 adds a
    reader to the broadcast ring, a second result ring and the TP ranks' shm communicator."""
    env = dict(os.environ, SHARDLINE_TP_ALLREDUCE="shm")
    proc = subprocess.Popen(
        [sys.executable, "-c", ENGINE_SCRIPT, str(tiny_llama_dir), str(tp)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    workers: list[int] = []
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("PIDS"), f"engine did not start: {line!r}"
        workers = [int(p) for p in line.split()[1:]]
        assert len(workers) == tp
        owners = {proc.pid, *workers}
        before = _names_of(owners)
        segments = [n for n in before if not n.startswith("sem.")]
        assert len(segments) == 1 + tp, before  # the engine's rings, named while it runs
        assert len(before) - len(segments) == 2 * tp + 2 * tp, before  # 2 per reader per ring
        proc.kill()
        proc.wait(30)
        _wait_for(lambda: not any(_alive(p) for p in workers), "the workers exit")
        # Nobody has swept: the names are gone because the workers unlinked them.
        assert _names_of(owners) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_ring_names_are_the_names_a_ring_creates() -> None:
    ring = Ring.create(4, 64, 3)
    try:
        created = {n for n in our_shm_entries() if n.removeprefix("sem.").startswith(ring.base[1:] + "_")}
        named = {("" if n.endswith("_seg") else "sem.") + n[1:] for n in ring_names(ring.address)}
        assert named == created and len(created) == 1 + 2 * 3
    finally:
        ring.close()


async def test_worker_channels_unlink_every_engine_ring_by_name() -> None:
    """`unlink_shm_names` removes the broadcast ring and every result ring (this test's own
    names; the engine end then closes without finding them)."""
    before = set(our_shm_entries())
    engine = await open_engine_channels("shm", 2)
    try:
        mine = set(_names_of({os.getpid()})) - before
        assert len([n for n in mine if not n.startswith("sem.")]) == 3  # broadcast + 2 results
        assert len(mine) == 3 + 2 * 2 + 2 + 2  # broadcast: 2 readers; results: 1 reader each
        worker = connect_worker_channels(engine.address, 0)
        try:
            assert worker.unlink_shm_names()
            assert not mine & set(our_shm_entries())
            assert worker.unlink_shm_names() == []  # idempotent
        finally:
            worker.close()
    finally:
        await engine.aclose()
