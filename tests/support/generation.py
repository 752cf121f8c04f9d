"""Driving an engine from tests: many requests at once, each one's final tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio


async def generate_all(engine: Any, prompts: Sequence[str | list[int]], params: Any) -> list[list[int]]:
    """Run every prompt concurrently; returns each request's output token ids, in prompt order."""
    results: list[list[int]] = [[] for _ in prompts]

    async def one(i: int) -> None:
        async for out in engine.generate(prompts[i], params):
            results[i] = out.token_ids

    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(one, i)
    return results


def check_idle(engine: Any) -> Any:
    """Assert that an engine with nothing to do holds no KV block and no request, and that its
    block accounting is consistent; returns its stats."""
    stats = engine.stats()
    assert (stats.num_kv_blocks_used, stats.num_running, stats.num_waiting) == (0, 0, 0)
    for core in engine._cores:
        core.scheduler.kv_cache.check_invariants([])
    return stats
