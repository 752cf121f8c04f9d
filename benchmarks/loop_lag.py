"""The server's event loop under hostile requests and slow clients: /health latency.

Starts `shardline serve` (the default model, or --model), polls /health every 5 ms from a
thread of its own, and sends, one at a time, hostile requests (issue 20 item 4): a 3.9 MB
prompt, a 4 MB chat message, 4 MB of token ids, the largest stop list accepted (64 x 512
characters) and a 4 MB one, a prompt just under the engine's character bound (it must be
tokenized to be refused), 100,000 small chat messages. For each it prints the answer and the
worst /health latency while it ran. Then (item 5) it opens slow connections (idle, headers a
byte at a time, a body that stalls) and prints /health and completion latencies meanwhile,
and how soon the server closed the slow ones.

    python benchmarks/loop_lag.py [--model PATH] [--slow 300] [--slow-timeout 3]
    python benchmarks/loop_lag.py --pythonpath DIR   # another checkout's code (DIR/shardline)

Everything talks to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import httpx

LAUNCH = "import sys; from shardline.engine.cli import main; sys.exit(main())"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Poller(threading.Thread):
    """GET /health every `period_s`; keeps (start, latency) of each."""

    def __init__(self, base_url: str, period_s: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.base_url, self.period_s = base_url, period_s
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=120) as client:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    client.get("/health")
                except httpx.HTTPError:
                    pass  # counted by its latency all the same
                self.samples.append((started, time.monotonic() - started))
                time.sleep(self.period_s)

    def worst(self, start: float, end: float) -> float:
        """The longest /health answer among polls that overlapped [start, end]."""
        return max((lat for t, lat in self.samples if t <= end and t + lat >= start), default=0.0)

    def latencies(self, start: float, end: float) -> list[float]:
        return [lat for t, lat in self.samples if start <= t <= end]


def hostile_requests(max_prompt_chars: int | None) -> list[tuple[str, str, dict[str, Any]]]:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    stop_512 = [f"{i:03d}" + "z" * 509 for i in range(64)]
    out: list[tuple[str, str, dict[str, Any]]] = [
        ("3.9 MB prompt", "/v1/completions", {"prompt": "a" * 3_900_000}),
        ("4 MB chat message", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 4_000_000}]}),
        ("4 MB of token ids", "/v1/completions", {"prompt": [65] * 990_000}),
        ("64 stop strings x 512", "/v1/completions",
         {"prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0, "stop": stop_512}),
        ("1000 stop strings x 4000", "/v1/completions", {"prompt": "hi", "stop": ["s" * 4000] * 1000}),
        ("100,000 small chat messages", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": "hi"}] * 100_000}),
    ]  # fmt: skip
    if max_prompt_chars is not None and max_prompt_chars < 4_000_000:
        text = " ".join(rng.choice(words) for _ in range(max_prompt_chars // 3))[: max_prompt_chars - 10]
        out.append((f"{len(text):,}-char prompt (under the bound)", "/v1/completions", {"prompt": text}))
    return out


async def slow_connection(port: int, kind: str, closed_after: list[tuple[str, float]]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    try:
        if kind == "stalled-body":
            writer.write(head + b"Content-Length: 1000\r\n\r\n" + b'{"prompt": "')
        trickle = head + b"Content-Length: 20\r\n\r\n" if kind == "slow-headers" else b""
        sent = 0
        while True:
            try:
                data = await asyncio.wait_for(reader.read(65536), timeout=1.0)
            except TimeoutError:
                if sent < len(trickle):
                    writer.write(trickle[sent:sent + 1])
                    sent += 1
                continue
            if not data:
                break
    except (ConnectionError, OSError):
        pass
    closed_after.append((kind, time.monotonic() - started))
    writer.close()


async def slowloris(port: int, count: int, wait_s: float, poller: Poller, base_url: str) -> dict[str, Any]:
    closed: list[tuple[str, float]] = []
    kinds = ("idle", "slow-headers", "stalled-body")
    tasks = [asyncio.create_task(slow_connection(port, kinds[i % 3], closed)) for i in range(count)]
    started = time.monotonic()
    completion_latency: list[float] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        while time.monotonic() - started < wait_s and len(closed) < count:
            t0 = time.monotonic()
            response = await client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "temperature": 0})
            if response.status_code == 200:
                completion_latency.append(time.monotonic() - t0)
            await asyncio.sleep(0.2)
    health = poller.latencies(started, time.monotonic())
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    by_kind = {k: sorted(s for kind, s in closed if kind == k) for k in kinds}
    return {
        "connections": count,
        "closed": len(closed),
        "closed_after_s": {k: (round(v[0], 2), round(v[-1], 2)) if v else None for k, v in by_kind.items()},
        "health_p50_ms": round(1000 * statistics.median(health), 1) if health else None,
        "health_max_ms": round(1000 * max(health), 1) if health else None,
        "completions_served": len(completion_latency),
        "completion_median_s": round(statistics.median(completion_latency), 3) if completion_latency else None,
        "completion_max_s": round(max(completion_latency), 3) if completion_latency else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path (default: the default model)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--slow", type=int, default=300, help="slow connections to open (0: none)")
    parser.add_argument("--slow-timeout", type=float, default=3.0,
                        help="--http-header-timeout and --http-body-timeout for the server (0: leave the defaults)")
    parser.add_argument("--slow-wait", type=float, default=40.0, help="seconds to watch the slow connections")
    parser.add_argument("--pythonpath", default=None, help="run the server from DIR/shardline (another checkout)")
    args = parser.parse_args()

    port = free_port()
    command = [sys.executable, "-c", LAUNCH, "serve", "--port", str(port)]
    if args.model:
        command += ["--model", args.model]
    if args.max_model_len:
        command += ["--max-model-len", str(args.max_model_len)]
    if args.slow_timeout:
        command += ["--http-header-timeout", str(args.slow_timeout), "--http-body-timeout", str(args.slow_timeout)]
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    log = open(f"/tmp/loop_lag_{port}.log", "w")  # noqa: SIM115 - lives as long as the server
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {"hostile": {}}
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(base_url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start; see {log.name}")
            time.sleep(0.5)
        model = httpx.get(base_url + "/v1/models", timeout=10).json()["data"][0]
        bound = None
        try:
            from shardline.engine.model_info import _max_token_chars
            from shardline.engine.tokenizer import load_tokenizer

            if args.model:
                bound = model["max_model_len"] * _max_token_chars(load_tokenizer(args.model))
            else:
                from shardline.model.fetch import fetch_default_model

                bound = model["max_model_len"] * _max_token_chars(load_tokenizer(fetch_default_model()))
        except Exception as exc:  # noqa: BLE001 - the near-bound case is optional
            print(f"(no prompt near the character bound: {exc})")
        print(f"model {model['id']}, max_model_len {model['max_model_len']}, character bound {bound}")

        poller = Poller(base_url)
        poller.start()
        time.sleep(2)
        idle = poller.latencies(0, time.monotonic())
        results["idle_health_max_ms"] = round(1000 * max(idle), 1)
        print(f"{'idle':44s} /health max {1000 * max(idle):7.1f} ms (median {1000 * statistics.median(idle):.1f})")
        with httpx.Client(base_url=base_url, timeout=600) as client:
            for name, path, body in hostile_requests(bound):
                payload = json.dumps(body).encode()
                start = time.monotonic()
                response = client.post(path, content=payload, headers={"content-type": "application/json"})
                end = time.monotonic()
                time.sleep(0.3)  # polls that started during the request finish
                worst = poller.worst(start, end)
                param = response.json().get("error", {}).get("param") if response.status_code != 200 else None
                results["hostile"][name] = {"status": response.status_code, "param": param,
                                            "seconds": round(end - start, 3), "health_max_ms": round(1000 * worst, 1)}
                print(f"{name:44s} /health max {1000 * worst:7.1f} ms | {response.status_code} {param or ''} "
                      f"in {end - start:.2f} s ({len(payload) / 1e6:.1f} MB)")
        if args.slow:
            results["slowloris"] = asyncio.run(slowloris(port, args.slow, args.slow_wait, poller, base_url))
            print(f"{args.slow} slow connections: {json.dumps(results['slowloris'])}")
        poller.stop.set()
        rss = None
        try:
            with open(f"/proc/{server.pid}/status") as f:
                rss = next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM"))
        except (OSError, StopIteration):
            pass
        results["server_peak_rss_mib"] = rss
        print(f"server peak RSS {rss} MiB")
        print(json.dumps(results))
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


if __name__ == "__main__":
    main()
