"""Fixtures: the app around a fake engine, and an in-process client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import FastAPI

from engine.server import build_app
from server.e2e_support import real_server, references  # noqa: F401 - session fixtures (slow tests)
from server.fake_engine import FakeEngine
from server.helpers import asgi_client

MODEL = "fake-model"


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine(max_model_len=256)


@pytest.fixture
def app(fake_engine: FakeEngine) -> FastAPI:
    return build_app(fake_engine, served_model_name=MODEL, api_key=None, max_body_bytes=64 * 1024)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(app) as c:
        yield c


@pytest.fixture(scope="session", autouse=True)
def _stop_resource_tracker() -> Iterator[None]:
    """An in-process Engine (the slow tests' references) spawns multiprocessing's resource
    tracker; stop it at the end so the session's leak check sees no child left."""
    yield
    from multiprocessing import resource_tracker

    resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]
