"""Start-up, footprint and recovery: how soon a user gets an answer, and at what memory cost.

Each measure runs in fresh processes, as a user's would, on the default model:

* ready: from a fresh `python` to `await Engine.start(EngineConfig())` returning, and to the
  first streamed token of a short chat (`engine.chat`, max_tokens 1); warm (every cache built:
  model converted, kernels compiled, weights packed) and, with `--cold`, cold (an empty
  `SHARDLINE_HOME`: download, conversion, kernel build, packing; the pip cache may be warm).
* generate: wall time of `shardline generate "..." --max-tokens 16`, end to end.
* rss: resident memory of the engine process and its workers together, after a few requests
  (the KV cache committed by then), and each process's share.
* recovery: a greedy stream of 200 tokens; after its 40th token the worker is SIGKILLed; the
  time from the kill to the next token, and whether the tokens equal an uninterrupted run's.
* llama.cpp's server on the same GGUF (`-t` = CPU count, its default context), where
  benchmarks/build_llama_cpp.sh has built it: from the command to /health answering OK, to the
  first token of the same chat, and its RSS. Skipped, with a message, where it is not built.

    python benchmarks/startup.py [--repeat 3] [--cold] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from typing import Any

CHAT = [{"role": "user", "content": "What is the capital of France?"}]

ENGINE_CHILD = textwrap.dedent("""
    import asyncio, json, sys, time
    t0 = float(sys.argv[1])
    from shardline import Engine, EngineConfig, SamplingParams
    import psutil

    async def main():
        engine = await Engine.start(EngineConfig())
        ready = time.time()
        async for _ in engine.chat(CHAT, SamplingParams(max_tokens=1, temperature=0)):
            pass
        first = time.time()
        for _ in range(3):
            async for _ in engine.chat(CHAT, SamplingParams(max_tokens=32, temperature=0)):
                pass
        await asyncio.sleep(1.0)  # the KV cache's background commit
        me = psutil.Process()
        rss = {p.pid: p.memory_info().rss for p in [me, *me.children(recursive=True)]}
        await engine.aclose()
        print(json.dumps({"ready_s": ready - t0, "first_token_s": first - t0,
                          "rss_bytes": sum(rss.values()), "rss_engine_bytes": rss[me.pid],
                          "rss_workers_bytes": sum(v for k, v in rss.items() if k != me.pid)}))

    asyncio.run(main())
""").replace("CHAT", repr(CHAT))

RECOVERY_CHILD = textwrap.dedent("""
    import asyncio, json, os, signal, sys, time
    from shardline import Engine, EngineConfig, SamplingParams
    PARAMS = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def run(engine, kill_after):
        tokens, killed_at, resumed_at = [], None, None
        async for out in engine.chat(CHAT, PARAMS):
            now = time.time()
            if killed_at is not None and resumed_at is None and out.delta_token_ids:
                resumed_at = now
            tokens += out.delta_token_ids
            if kill_after is not None and killed_at is None and len(tokens) >= kill_after:
                pid = engine._cores[0].executor.worker_pids[0]
                killed_at = time.time()
                os.kill(pid, signal.SIGKILL)
        return tokens, killed_at, resumed_at

    async def main():
        async with await Engine.start(EngineConfig(max_worker_restarts=3)) as engine:
            reference, _, _ = await run(engine, None)
            tokens, killed_at, resumed_at = await run(engine, 40)
        print(json.dumps({"kill_to_token_s": resumed_at - killed_at, "same_tokens": tokens == reference}))

    asyncio.run(main())
""").replace("CHAT", repr(CHAT))


def _python_child(code: str, env: dict[str, str] | None, *args: str, timeout: float | None = 900) -> dict[str, Any]:
    """Run `code` in a fresh Python with `args`; its last stdout line, parsed as JSON."""
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_engine(env: dict[str, str]) -> dict[str, Any]:
    return _python_child(ENGINE_CHILD, env, repr(time.time()))


def measure_generate(env: dict[str, str]) -> float:
    shardline = shutil.which("shardline", path=os.path.dirname(sys.executable)) or "shardline"
    start = time.time()
    proc = subprocess.run([shardline, "generate", CHAT[0]["content"], "--max-tokens", "16"],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"shardline generate failed:\n{proc.stderr[-3000:]}")
    return time.time() - start


def llama_cpp_server() -> pathlib.Path | None:
    home = pathlib.Path(os.environ.get("LLAMA_CPP_HOME") or "~/.cache/shardline/llama.cpp").expanduser()
    binary = home / "bin" / "llama-server"
    return binary if binary.is_file() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(proc: subprocess.Popen[bytes], base: str, start: float, limit: float) -> None:
    """Until llama-server's /health answers OK; raise if it exits or `limit` s pass from `start`."""
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() - start > limit:
            raise RuntimeError(f"llama-server not healthy after {limit:.0f} s")
        time.sleep(0.02)


def start_llama_server(
    binary: pathlib.Path, gguf: pathlib.Path, *, threads: int, context: int, slots: int,
    extra: tuple[str, ...] = (), limit: float = 300,
) -> tuple[subprocess.Popen[bytes], str]:
    """llama.cpp's server on `gguf` with `threads` threads and `slots` parallel slots over one
    unified KV cache of `context` tokens, on a free local port, once /health answers; returns
    the process and its base URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [str(binary), "-m", str(gguf), "-t", str(threads), "-c", str(context), "-np", str(slots),
         "--kv-unified", *extra, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, time.time(), limit)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, base


def stop_server(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGINT, then SIGKILL if it has not exited after `grace` s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure_llama_cpp(binary: pathlib.Path, gguf: pathlib.Path) -> dict[str, Any]:
    import psutil

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    start = time.time()
    proc = subprocess.Popen([str(binary), "-m", str(gguf), "-t", str(os.cpu_count() or 1),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(proc, base, start, 120)
        ready = time.time()
        body = json.dumps({"messages": CHAT, "max_tokens": 1, "temperature": 0}).encode()
        request = urllib.request.Request(f"{base}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            r.read()
        first = time.time()
        for _ in range(3):
            body = json.dumps({"messages": CHAT, "max_tokens": 32, "temperature": 0}).encode()
            with urllib.request.urlopen(urllib.request.Request(
                    f"{base}/v1/chat/completions", data=body,
                    headers={"Content-Type": "application/json"}), timeout=120) as r:
                r.read()
        rss = psutil.Process(proc.pid).memory_info().rss
        return {"ready_s": ready - start, "first_token_s": first - start, "rss_bytes": rss}
    finally:
        stop_server(proc, 10)


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _runs(rows: list[dict[str, Any]], key: str) -> str:
    return ", ".join(f"{r[key]:.2f}" for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each warm measure (median reported)")
    parser.add_argument("--cold", action="store_true", help="also measure one start with an empty SHARDLINE_HOME")
    parser.add_argument("--skip-recovery", action="store_true")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    from shardline.model.fetch import GGUF_NAME, fetch_default_model

    env = {k: v for k, v in os.environ.items() if k != "SHARDLINE_LOG_LEVEL"}
    env["SHARDLINE_LOG_LEVEL"] = "WARNING"
    model_dir = fetch_default_model()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
    }
    measure_engine(env)  # warms every cache (conversion, kernels, packed weights) once
    warm = [measure_engine(env) for _ in range(args.repeat)]
    results["warm"] = warm
    gen = [measure_generate(env) for _ in range(args.repeat)]
    results["generate_s"] = gen
    print(f"warm engine ready      {_median(warm, 'ready_s'):6.2f} s   (runs: {_runs(warm, 'ready_s')})")
    print(f"warm first token       {_median(warm, 'first_token_s'):6.2f} s   (runs: {_runs(warm, 'first_token_s')})")
    print(f"shardline generate     {statistics.median(gen):6.2f} s   (runs: {', '.join(f'{g:.2f}' for g in gen)})")
    print(f"RSS, all processes     {_median(warm, 'rss_bytes') / 2**20:6.0f} MiB (engine {_median(warm, 'rss_engine_bytes') / 2**20:.0f}, "
          f"workers {_median(warm, 'rss_workers_bytes') / 2**20:.0f})")
    if args.cold:
        with tempfile.TemporaryDirectory(prefix="shardline-cold-") as home:
            cold = measure_engine({**env, "SHARDLINE_HOME": home})
        results["cold"] = cold
        print(f"cold engine ready      {cold['ready_s']:6.2f} s   first token {cold['first_token_s']:.2f} s")
    if not args.skip_recovery:
        rec = [_python_child(RECOVERY_CHILD, env) for _ in range(args.repeat)]
        results["recovery"] = rec
        print(f"kill -> resumed token  {_median(rec, 'kill_to_token_s'):6.2f} s   (runs: "
              f"{_runs(rec, 'kill_to_token_s')}; same tokens: {all(r['same_tokens'] for r in rec)})")
    binary = llama_cpp_server()
    if binary is None:
        print("llama.cpp: not built (benchmarks/build_llama_cpp.sh builds it); skipped")
    else:
        peer = [measure_llama_cpp(binary, model_dir / GGUF_NAME) for _ in range(args.repeat)]
        results["llama_cpp"] = peer
        print(f"llama.cpp server ready {_median(peer, 'ready_s'):6.2f} s   first token {_median(peer, 'first_token_s'):.2f} s   "
              f"RSS {_median(peer, 'rss_bytes') / 2**20:.0f} MiB")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
