"""Hostile requests do not stall the server's event loop (issue 20 item 4).

A real engine (the tiny model) and the serve command's HTTP stack run in this test's event
loop, beside a ticker that sleeps 10 ms at a time and records its longest gap: the loop's
worst stall. The hostile requests are sent from a thread (so encoding their 4 MB bodies is no
work of the loop under test): a 3.9 MB prompt, a 4 MB chat message, a 4 MB prompt of token
ids, the largest stop list accepted (64 strings of 512 characters) and ones over it. Each gets
its answer (a 400 naming the field, or the served completion), the ticker never stalls for
`MAX_STALL_S`, and the next ordinary request gets the same greedy answer as before.

Before the fix, the server tokenized a 4 MB prompt on the loop for its default `max_tokens`
(/health blocked 8.6 s); `benchmarks/loop_lag.py` measures the same on a `shardline serve`.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

import anyio
import httpx
import uvicorn

from reliability.http_support import MAX_MODEL_LEN, REFERENCE_BODY
from shardline.engine.api import Engine
from shardline.engine.config import EngineConfig
from shardline.engine.server import build_app
from shardline.engine.server.launch import ServeOptions, uvicorn_config

MAX_STALL_S = 2.0  # generous: the loop's normal worst on a loaded machine is tens of ms
STOP_512 = [f"{i:03d}" + "z" * 509 for i in range(64)]


def _hostile_requests() -> list[tuple[str, str, dict[str, Any], int, str | None]]:
    """(name, path, body, expected status, field named by the 400)."""
    chat_4mb = {"messages": [{"role": "user", "content": "x" * 4_000_000}]}
    return [
        ("3.9 MB prompt", "/v1/completions", {"prompt": "a" * 3_900_000}, 400, "prompt"),
        ("3.9 MB prompt, max_tokens", "/v1/completions", {"prompt": "a b " * 975_000, "max_tokens": 4}, 400, "prompt"),
        ("4 MB chat message", "/v1/chat/completions", chat_4mb, 400, "messages"),
        ("4 MB chat message, streamed", "/v1/chat/completions", {**chat_4mb, "stream": True}, 400, "messages"),
        ("4 MB of token ids", "/v1/completions", {"prompt": [65] * 990_000}, 400, "prompt"),
        ("64 stop strings x 512", "/v1/completions",
         {"prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0, "stop": STOP_512}, 200, None),
        ("65 stop strings x 512", "/v1/completions",
         {"prompt": "hi", "max_tokens": 8, "stop": [*STOP_512, "y" * 512]}, 400, "stop"),
        ("1000 stop strings x 4000", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": "hi"}], "stop": ["s" * 4000] * 1000}, 400, "stop"),
    ]  # fmt: skip


def _send_all(base_url: str, requests: list[tuple[str, str, dict[str, Any], int, str | None]]) -> list[str]:
    """Send each request (on this thread); the problems found, by request name."""
    problems = []
    with httpx.Client(base_url=base_url, timeout=120) as client:
        for name, path, body, status, field in requests:
            response = client.post(path, json=body)
            if response.status_code != status:
                problems.append(f"{name}: {response.status_code} {response.text[:300]}")
            elif field is not None and response.json()["error"]["param"] != field:
                problems.append(f"{name}: names {response.json()['error']['param']!r}, not {field!r}")
    return problems


async def test_hostile_requests_do_not_stall_the_event_loop(tiny_llama_dir: pathlib.Path) -> None:
    config = EngineConfig(model=str(tiny_llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=128, block_size=4)
    async with await Engine.start(config) as engine:
        assert engine.max_prompt_chars < 3_900_000  # the bound that refuses them unread
        app = build_app(engine, served_model_name="tiny", api_key=None)  # the default 4 MiB body limit
        server = uvicorn.Server(uvicorn_config(app, ServeOptions(port=0, log_level="warning"), lifespan="off"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            with anyio.fail_after(30):
                while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
                    await anyio.sleep(0.01)
            base_url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
            async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
                before = (await client.post("/v1/completions", json=REFERENCE_BODY)).json()

                stalls: list[float] = []
                done = anyio.Event()

                async def ticker() -> None:
                    last = time.monotonic()
                    while not done.is_set():
                        await anyio.sleep(0.01)
                        now = time.monotonic()
                        stalls.append(now - last - 0.01)
                        last = now

                problems: list[str] = []

                async def run_hostile() -> None:
                    try:
                        problems.extend(await anyio.to_thread.run_sync(_send_all, base_url, _hostile_requests()))
                    finally:
                        done.set()

                with anyio.fail_after(300):
                    async with anyio.create_task_group() as probe:
                        probe.start_soon(ticker)
                        probe.start_soon(run_hostile)
                assert not problems, problems
                worst = max(stalls)
                assert worst < MAX_STALL_S, f"the event loop stalled {worst * 1000:.0f} ms"

                after = await client.post("/v1/completions", json=REFERENCE_BODY)
                assert after.status_code == 200, after.text
                assert after.json()["choices"] == before["choices"]
                assert (await client.get("/health")).status_code == 200
            server.should_exit = True
