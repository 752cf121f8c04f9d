"""Worker test fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def _stop_resource_tracker() -> Iterator[None]:
    """Spawning starts multiprocessing's resource-tracker process; stop it when we are done."""
    yield
    from multiprocessing import resource_tracker

    resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]
