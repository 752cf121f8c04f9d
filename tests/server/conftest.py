"""Fixtures: the app around a fake engine, and an in-process client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from server.e2e_support import real_server, references  # noqa: F401 - session fixtures (slow tests)
from server.fake_engine import FakeEngine
from server.helpers import asgi_client
from shardline.engine.server import build_app

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
