"""Waiting for a condition the code under test reaches asynchronously."""

from __future__ import annotations

from collections.abc import Callable

import anyio


async def wait_until(predicate: Callable[[], bool], deadline_s: float = 10.0, period: float = 0.02) -> None:
    """Poll `predicate` until true; `TimeoutError` after `deadline_s` seconds (a hang is a failure)."""
    with anyio.fail_after(deadline_s):
        while not predicate():  # noqa: ASYNC110 - polling observable state is the point here
            await anyio.sleep(period)
