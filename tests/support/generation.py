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
