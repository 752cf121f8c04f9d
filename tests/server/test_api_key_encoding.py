"""The API key is compared as its UTF-8 bytes (issue 20 item 3): a non-ASCII key sent as UTF-8
is accepted, the same key sent as latin-1 (or bytes that are not UTF-8) is refused, in-process
and over a real socket (where h11 hands the header's bytes through untouched)."""

from __future__ import annotations

import anyio
import pytest
from fastapi import FastAPI

from server.conftest import MODEL
from server.fake_engine import FakeEngine
from server.helpers import asgi_client, assert_openai_error, uvicorn_server
from shardline.engine.server import build_app

KEY = "sk-clé-ключ-🔑"  # noqa: RUF001 - non-ASCII on purpose
LATIN1_KEY = "sk-clé"  # one that latin-1 can encode too
MODELS = "/v1/models"


@pytest.fixture
def keyed(fake_engine: FakeEngine) -> FastAPI:
    return build_app(fake_engine, served_model_name=MODEL, api_key=KEY)


@pytest.fixture
def latin1_keyed(fake_engine: FakeEngine) -> FastAPI:
    return build_app(fake_engine, served_model_name=MODEL, api_key=LATIN1_KEY)


async def test_a_non_ascii_key_is_accepted_as_utf8(keyed: FastAPI, latin1_keyed: FastAPI) -> None:
    async with asgi_client(keyed) as client:
        response = await client.get(MODELS, headers={"Authorization": b"Bearer " + KEY.encode("utf-8")})
        assert response.status_code == 200, response.text
        # The scheme is case-insensitive and extra blanks around the key do not matter.
        response = await client.get(MODELS, headers={"Authorization": b"bearer   " + KEY.encode("utf-8")})
        assert response.status_code == 200, response.text
    async with asgi_client(latin1_keyed) as client:
        response = await client.get(MODELS, headers={"Authorization": b"Bearer " + LATIN1_KEY.encode("utf-8")})
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("value", [
    b"Bearer " + LATIN1_KEY.encode("latin-1"),  # the key in another encoding
    b"Bearer " + LATIN1_KEY.encode("utf-8").decode("latin-1").encode("utf-8"),  # UTF-8 read as latin-1, re-encoded
    b"Bearer sk-cl\xff\xfe",  # not UTF-8 at all
    b"Bearer " + LATIN1_KEY.encode("utf-8")[:-1],  # cut inside the multi-byte character
])  # fmt: skip
async def test_the_key_in_any_other_encoding_is_refused(latin1_keyed: FastAPI, value: bytes) -> None:
    async with asgi_client(latin1_keyed) as client:
        response = await client.get(MODELS, headers={"Authorization": value})
        assert_openai_error(response, 401, code="invalid_api_key")


async def test_over_a_socket_the_same_bytes_decide(keyed: FastAPI, latin1_keyed: FastAPI) -> None:
    async def status(base_url: str, value: bytes) -> bytes:
        port = int(base_url.rsplit(":", 1)[1])
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: "
                              + value + b"\r\n\r\n")
            with anyio.fail_after(10):
                reply = await stream.receive()  # the status line comes in the first segment
        return reply.split(b"\r\n", 1)[0]

    async with uvicorn_server(keyed) as base_url:
        assert await status(base_url, b"Bearer " + KEY.encode("utf-8")) == b"HTTP/1.1 200 OK"
    async with uvicorn_server(latin1_keyed) as base_url:
        assert await status(base_url, b"Bearer " + LATIN1_KEY.encode("utf-8")) == b"HTTP/1.1 200 OK"
        assert await status(base_url, b"Bearer " + LATIN1_KEY.encode("latin-1")) == b"HTTP/1.1 401 Unauthorized"


def test_a_key_that_is_not_text_is_refused_when_the_app_is_built(fake_engine: FakeEngine) -> None:
    # An environment variable holding bytes that are not UTF-8 reaches Python as a lone surrogate.
    with pytest.raises(ValueError, match="UTF-8"):
        build_app(fake_engine, served_model_name=MODEL, api_key="sk-\udcff")
