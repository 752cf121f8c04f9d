"""vLLM's and OpenAI's small endpoints (issue 21, item 3): models.retrieve, /tokenize and
/detokenize (vLLM's shapes), /version, /ping; each bad input gets its 400/404 and the next
request is served."""

from __future__ import annotations

import httpx
import pytest

import shardline
from server.conftest import MODEL
from server.fake_engine import FakeEngine


async def test_retrieve_the_served_model_or_404(client: httpx.AsyncClient) -> None:
    r = await client.get(f"/v1/models/{MODEL}")
    assert r.status_code == 200 and r.json()["id"] == MODEL and r.json()["max_model_len"] == 256
    r = await client.get("/v1/models/another-model")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert (await client.get("/v1/models")).status_code == 200


async def test_tokenize_and_detokenize_round_trip(client: httpx.AsyncClient, fake_engine: FakeEngine) -> None:
    r = await client.post("/tokenize", json={"model": MODEL, "prompt": "héllo"})
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == fake_engine.tokenizer.encode("héllo") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 256
    r = await client.post("/detokenize", json={"tokens": body["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": "héllo"}
    chat = [{"role": "user", "content": "hi"}]
    r = await client.post("/tokenize", json={"messages": chat})
    assert r.json()["tokens"] == fake_engine.tokenizer.apply_chat_template(chat)


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, "prompt"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "model": "nope"}, 404, "model"),
    ("/tokenize", {"prompt": "x", "extra_field": 1}, 400, None),
    ("/tokenize", {"prompt": "y" * 5_000}, 400, "prompt"),  # past max_prompt_chars
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": [10**6]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, None),
])
async def test_bad_tokenize_requests_get_errors_and_the_next_is_served(
        client: httpx.AsyncClient, path: str, body: dict[str, object], status: int, param: str | None) -> None:
    r = await client.post(path, json=body)
    assert r.status_code == status, r.text
    if param is not None:
        assert r.json()["error"]["param"] == param
    assert (await client.post("/tokenize", json={"prompt": "ok"})).status_code == 200


async def test_version_and_ping(client: httpx.AsyncClient) -> None:
    assert (await client.get("/version")).json() == {"version": shardline.__version__}
    r = await client.get("/ping")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
