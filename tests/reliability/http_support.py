"""Shared pieces of the HTTP reliability tests: a real `shardline serve` on the tiny model,
/metrics scraping, its worker processes, and a well-behaved client that checks answers.

Everything talks to 127.0.0.1 only. Servers are started through `server.process`, which
always terminates (then kills) the process on the way out.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from server.e2e_support import shardline_executable
from server.process import ServerProcess, server_process

MAX_MODEL_LEN = 256
STARTUP_DEADLINE_S = 180.0
REFERENCE_PROMPT = "The quick brown fox"
REFERENCE_BODY: dict[str, Any] = {"prompt": REFERENCE_PROMPT, "max_tokens": 12, "temperature": 0}


@contextmanager
def tiny_server(model_dir: pathlib.Path, tmp_path: pathlib.Path, *args: str) -> Iterator[ServerProcess]:
    """`shardline serve --model <tiny>` plus `args`, healthy; stopped (SIGTERM) afterwards."""
    command = [shardline_executable(), "serve", "--model", str(model_dir),
               "--max-model-len", str(MAX_MODEL_LEN), *args]
    with server_process(command, tmp_path) as server:
        server.wait_healthy(STARTUP_DEADLINE_S)
        yield server


def stop_cleanly(server: ServerProcess) -> None:
    """SIGTERM and expect exit code 0 (a clean shutdown after whatever the test did)."""
    code = server.stop(deadline_s=60)
    assert code == 0, f"server exited with {code}:\n{server.log()[-4000:]}"


def scrape(base_url: str) -> dict[str, float]:
    """/metrics as `name` -> value (labels other than finished_reason/status/path dropped)."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name
            for label in ("finished_reason", "status"):
                if label in sample.labels:
                    key += f":{sample.labels[label]}"
            if "path" in sample.labels:
                key += f":{sample.labels['path']}"
            out[key] = out.get(key, 0.0) + sample.value
    return out


IDLE_KEYS = ("shardline:kv_cache_blocks_used", "shardline:num_requests_running", "shardline:num_requests_waiting")


async def wait_idle(base_url: str, deadline_s: float = 30.0) -> dict[str, float]:
    """Wait until no KV block is used and no request runs or waits; returns that scrape."""
    end = time.monotonic() + deadline_s
    last: dict[str, float] = {}
    while time.monotonic() < end:
        last = await anyio.to_thread.run_sync(scrape, base_url)
        if all(last.get(key, -1) == 0 for key in IDLE_KEYS):
            return last
        await anyio.sleep(0.2)
    raise AssertionError(f"engine not idle after {deadline_s} s: { {k: last.get(k) for k in IDLE_KEYS} }")


def worker_processes(server: ServerProcess) -> list[psutil.Process]:
    """The engine's worker processes: the server's children running `python -m shardline.worker`."""
    children = psutil.Process(server.proc.pid).children(recursive=True)
    return [c for c in children if c.cmdline()[-2:] == ["-m", "shardline.worker"]]


def listening_ports(pid: int) -> set[int]:
    """TCP ports process `pid` listens on."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return set()
    return {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}


async def reference_text(client: httpx.AsyncClient, body: dict[str, Any] | None = None) -> str:
    """The greedy completion of `body` (default REFERENCE_BODY); asserts a full, 200 answer."""
    response = await client.post("/v1/completions", json=body or REFERENCE_BODY)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "length", choice
    return str(choice["text"])


@dataclass
class GoodClient:
    """A well-behaved client running beside hostile traffic: greedy requests, answers checked.

    Alternates a non-streaming completion, a streamed completion and a chat, and records
    every answer that is not the expected one. `run` loops until `stop` is set.
    """

    base_url: str
    expected_text: str
    expected_chat: str | None = None
    answered: int = 0
    problems: list[str] = field(default_factory=list)
    stop: anyio.Event = field(default_factory=anyio.Event)

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=60) as client:
            turn = 0
            while not self.stop.is_set():
                try:
                    await self._one(client, turn % 3)
                    self.answered += 1
                except Exception as exc:  # noqa: BLE001 - every failure is a finding
                    self.problems.append(f"turn {turn}: {exc!r}")
                turn += 1

    async def _one(self, client: httpx.AsyncClient, kind: int) -> None:
        if kind == 0:
            text = await reference_text(client)
        elif kind == 1:
            text = await stream_text(client, "/v1/completions", {**REFERENCE_BODY, "stream": True})
        else:
            body = {"messages": CHAT, "max_tokens": 12, "temperature": 0}
            response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            text = response.json()["choices"][0]["message"]["content"]
            if self.expected_chat is None:
                self.expected_chat = text
            expected = self.expected_chat
            assert text == expected, f"chat answer changed: {text!r} != {expected!r}"
            return
        assert text == self.expected_text, f"answer changed: {text!r} != {self.expected_text!r}"

    def check(self, at_least: int = 1) -> None:
        """No wrong answer and no error, and it did get answers while the test ran."""
        assert not self.problems, self.problems[:5]
        assert self.answered >= at_least, f"the well-behaved client got only {self.answered} answers"


CHAT = [{"role": "user", "content": "Say something."}]


async def stream_text(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> str:
    """Text of a streamed answer; fails on any status other than 200 or an in-band error."""
    import json

    parts: list[str] = []
    async with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, (await response.aread()).decode(errors="replace")
        done = False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                continue
            event = json.loads(data)
            assert "error" not in event, event
            for choice in event["choices"]:
                parts.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
        assert done, "stream ended without [DONE]"
    return "".join(parts)


def assert_no_server_errors(log: str, allowed: Sequence[str] = ()) -> None:
    """The server log has no traceback of an unhandled error (500s are logged that way)."""
    bad = [line for line in log.splitlines()
           if ("Traceback" in line or "unhandled error" in line or " 500 " in line)
           and not any(a in line for a in allowed)]
    assert not bad, "\n".join(bad[:20]) + "\n---\n" + log[-4000:]
