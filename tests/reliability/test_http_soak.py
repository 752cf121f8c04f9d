"""Soak: 32 streaming clients on loopback for a bounded time: zero errors, and neither the
server nor its workers grow in memory or file descriptors once warmed up.

Bounds (after warm-up, per process): RSS grows by less than 50 MiB; open file descriptors by
at most 16. The short run is in the default suite; the several-minute run is `slow`.
"""

from __future__ import annotations

import pathlib
import random
import time
from dataclasses import dataclass, field

import anyio
import httpx
import psutil
import pytest

from reliability.http_support import (
    assert_no_server_errors,
    reference_text,
    scrape,
    stop_cleanly,
    stream_text,
    tiny_server,
    wait_idle,
    worker_processes,
)
from server.process import ServerProcess

CLIENTS = 32
RSS_GROWTH_LIMIT = 50 << 20
FD_GROWTH_LIMIT = 16


@dataclass
class Sample:
    """RSS and open descriptors of the server and each worker at one moment."""

    rss: dict[int, int] = field(default_factory=dict)
    fds: dict[int, int] = field(default_factory=dict)


def sample(processes: list[psutil.Process]) -> Sample:
    out = Sample()
    for proc in processes:
        out.rss[proc.pid] = proc.memory_info().rss
        out.fds[proc.pid] = proc.num_fds()
    return out


async def soak(server: ServerProcess, duration_s: float, warmup_s: float) -> tuple[int, list[str], Sample, Sample]:
    """Run the clients for `duration_s`; returns answers, errors, and samples after warm-up / at the end."""
    processes = [psutil.Process(server.proc.pid), *worker_processes(server)]
    assert len(processes) >= 2, "no worker process found"
    errors: list[str] = []
    answered = 0
    deadline = time.monotonic() + duration_s
    warm: Sample | None = None
    late: Sample | None = None

    async def client_loop(n: int) -> None:
        nonlocal answered
        rng = random.Random(n)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            while time.monotonic() < deadline:
                chat = rng.random() < 0.5
                body: dict[str, object] = {"max_tokens": rng.randint(8, 40), "temperature": rng.choice([0, 0.8]),
                                           "seed": rng.randint(0, 1000), "stream": True}
                if chat:
                    body["messages"] = [{"role": "user", "content": f"client {n} says {rng.random()}"}]
                else:
                    body["prompt"] = f"client {n}: " + "lorem ipsum " * rng.randint(0, 12)
                try:
                    await stream_text(client, "/v1/chat/completions" if chat else "/v1/completions", body)
                    answered += 1
                except Exception as exc:  # noqa: BLE001 - every error is a finding
                    errors.append(f"client {n}: {exc!r}")

    async def sampler() -> None:
        # Both samples under full load (every client connected), so open sockets cancel out.
        nonlocal warm, late
        await anyio.sleep(warmup_s)
        warm = await anyio.to_thread.run_sync(sample, processes)
        await anyio.sleep(max(deadline - time.monotonic() - 1.0, 0))
        late = await anyio.to_thread.run_sync(sample, processes)

    with anyio.fail_after(duration_s + 90):  # a request in flight at the deadline still finishes
        async with anyio.create_task_group() as tg:
            tg.start_soon(sampler)
            for n in range(CLIENTS):
                tg.start_soon(client_loop, n)
    assert warm is not None and late is not None
    return answered, errors, warm, late


def check_growth(warm: Sample, end: Sample) -> str:
    """Assert the bounds; returns a one-line summary for the log."""
    lines = []
    for pid, rss in warm.rss.items():
        grew = end.rss[pid] - rss
        fds = end.fds[pid] - warm.fds[pid]
        lines.append(f"pid {pid}: rss {rss >> 20} -> {end.rss[pid] >> 20} MiB, fds {warm.fds[pid]} -> {end.fds[pid]}")
        assert grew < RSS_GROWTH_LIMIT, lines[-1]
        assert fds <= FD_GROWTH_LIMIT, lines[-1]
    return "; ".join(lines)


async def run_soak(tiny_dir: pathlib.Path, tmp_path: pathlib.Path, duration_s: float, warmup_s: float) -> None:
    with tiny_server(tiny_dir, tmp_path, "--max-num-seqs", "64") as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            before = await reference_text(client)
        answered, errors, warm, end = await soak(server, duration_s, warmup_s)
        assert not errors, f"{len(errors)} errors, e.g. {errors[:5]}"
        assert answered >= CLIENTS, f"only {answered} answers in {duration_s} s"
        summary = check_growth(warm, end)
        metrics = await wait_idle(server.base_url)
        assert not {k for k in metrics if k.startswith("shardline:http_responses_total:5")}
        ok = sum(v for k, v in scrape(server.base_url).items()
                 if k.startswith("shardline:http_responses_total:200"))
        assert ok >= answered + 1
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            assert await reference_text(client) == before
        print(f"soak {duration_s:.0f} s: {answered} streamed answers, 0 errors; {summary}")
        stop_cleanly(server)
        assert_no_server_errors(server.log())


@pytest.mark.timeout(240)
async def test_soak_short(tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    await run_soak(tiny_llama_dir, tmp_path, duration_s=25, warmup_s=10)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_soak_minutes(tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    await run_soak(tiny_llama_dir, tmp_path, duration_s=300, warmup_s=60)


@pytest.mark.parametrize("text", ["a\x85b", "line\u2028sep", "para\u2029sep", "\x1c\x1d\x1e\x0b\x0c", "plain"])
def test_sse_events_survive_unicode_line_splitting(text: str) -> None:
    """Found by the soak: a random model emitted U+0085, and a client splitting the stream with
    str.splitlines() (httpx's aiter_lines) got half an event. Each event is one line now."""
    import json

    from shardline.engine.server.streaming import sse

    event = sse(json.dumps({"text": text}, ensure_ascii=False))
    lines = event.splitlines()
    assert lines[1:] == [""], lines
    assert json.loads(lines[0].removeprefix("data: ")) == {"text": text}
