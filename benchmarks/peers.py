"""shardline's server vs llama.cpp's server on the same GGUF (issue 25, "Must show").

Both servers are started once and stay up together: shardline (`shardline serve`, the default
model unless --model) and llama.cpp's `llama-server` on the same GGUF file, both with 2 threads
(`--num-threads` / `-t`; --threads changes both). One client (httpx, this process) then runs
each measure on one server and then the other, alternating which goes first from round to
round; the table gives each measure's median over the rounds.

* one stream, inter-token latency: a streamed chat of `--itl-tokens` tokens (greedy,
  `ignore_eos`), the gaps between the arrivals of consecutive content chunks; p50 of each
  round's gaps.
* time to first token: a short streamed chat (startup.py's question, one question per request
  made distinct by a number, so no server answers from a whole cached prompt; both may reuse
  the chat template's shared system prefix, as a chatting user's server would), from sending
  the request to the first content chunk; the median of `--ttft-requests` requests per round.
* the 64-request workload: throughput.py's standard workload (its chat prompts as token ids,
  `max_tokens` spread over 16..128, greedy, `ignore_eos`), all sent at once to
  `/v1/completions`; useful tokens (the sum of max_tokens, each response checked to have
  produced all of its tokens) per wall second. llama.cpp serves it with `--parallel` slots
  (16 by default, `--slots`) over one unified KV cache.
* prefill: a prompt of 1,024 / 4,096 / 8,000 random token ids, new in every round and for each server
  (no cache hit), one output token; prompt tokens per second of the request's wall time.

Targets (issue 25): inter-token latency <= 0.5x llama.cpp's; time to first token <= llama.cpp's;
64-request workload >= 5x llama.cpp's useful tokens/s; prefill at 8k >= 4x llama.cpp's.

llama.cpp comes from `benchmarks/build_llama_cpp.sh` (`$LLAMA_CPP_HOME`, default
~/.cache/shardline/llama.cpp); where it is not built, its half is skipped with a message and
shardline's numbers are still printed.

    python benchmarks/peers.py [--rounds 3] [--json out.json] [--shardline-pythonpath DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import random
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from startup import (  # noqa: E402
    CHAT,
    _free_port,
    llama_cpp_server,
    start_llama_server,
    stop_server,
    wait_healthy,
)
from throughput import Workload, make_workload, pct  # noqa: E402

LAUNCH = "import sys; from shardline.engine.cli import main; sys.exit(main())"
PREFILL_LENGTHS = (1024, 4096, 8000)  # "8k": 8,000 prompt tokens and the output fit 8,192
CLOSE = {"Connection": "close"}
KV_BYTES = 2 << 30  # shardline's KV cache: the whole 64-request workload, or one 8k prompt


def start_shardline(
    model: str, threads: int, pythonpath: str | None, activations: str = "float32"
) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {**os.environ, "SHARDLINE_LOG_LEVEL": "WARNING", "SHARDLINE_CPU_ACTIVATIONS": activations}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    command = [
        sys.executable,
        "-c",
        LAUNCH,
        "serve",
        "--model",
        model,
        "--port",
        str(port),
        "--num-threads",
        str(threads),
        "--max-model-len",
        "8192",
        "--kv-cache-memory-bytes",
        str(KV_BYTES),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(proc, base, time.time(), 600)
    return proc, base


def start_llama_cpp(
    binary: pathlib.Path, gguf: pathlib.Path, threads: int, slots: int
) -> tuple[subprocess.Popen[bytes], str]:
    # a context of 16,384: one 8k prompt in a slot, or the 64 requests over the slots
    return start_llama_server(binary, gguf, threads=threads, context=16384, slots=slots,
                              extra=("--timeout", "3600"))


def _content_chunks(response: httpx.Response) -> Any:
    """Arrival time of every SSE chunk that carries generated text."""
    for line in response.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        now = time.perf_counter()
        choices = json.loads(line[6:]).get("choices") or []
        if any((c.get("delta") or {}).get("content") or c.get("text") for c in choices):
            yield now


def stream_chat(
    client: httpx.Client, base: str, messages: list[dict[str, str]], max_tokens: int
) -> list[float]:
    """Seconds from sending the request to each content chunk."""
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    start = time.perf_counter()
    # A connection per request, on both sides: llama-server drops a kept-alive connection
    # after a stream, and a client that reused it would see the drop.
    with client.stream("POST", f"{base}/v1/chat/completions", json=body, headers=CLOSE) as response:
        response.raise_for_status()
        return [t - start for t in _content_chunks(response)]


def measure_itl(client: httpx.Client, base: str, tokens: int) -> float:
    arrivals = stream_chat(client, base, CHAT, tokens)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return pct(gaps, 50)


def measure_ttft(client: httpx.Client, base: str, requests: int, tag: str) -> float:
    firsts = []
    for i in range(requests):
        question = f"Question {tag}-{i}: {CHAT[0]['content']}"
        firsts.append(stream_chat(client, base, [{"role": "user", "content": question}], 1)[0])
    return statistics.median(firsts)


async def _workload(base: str, work: Workload) -> float:
    limits = httpx.Limits(
        max_connections=len(work.prompts), max_keepalive_connections=len(work.prompts)
    )
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:

        async def one(i: int) -> None:
            body = {
                "prompt": work.prompts[i],
                "max_tokens": work.max_tokens[i],
                "temperature": 0,
                "ignore_eos": True,
            }
            response = await client.post(f"{base}/v1/completions", json=body)
            response.raise_for_status()
            produced = response.json()["usage"]["completion_tokens"]
            if produced != work.max_tokens[i]:
                raise RuntimeError(
                    f"{base}: request {i} produced {produced} of {work.max_tokens[i]} tokens"
                )

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(work.prompts))))
        return work.useful_tokens / (time.perf_counter() - start)


def measure_prefill(
    client: httpx.Client, base: str, length: int, rng: random.Random, vocab: int
) -> float:
    prompt = [rng.randrange(300, vocab) for _ in range(length)]
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0}
    start = time.perf_counter()
    response = client.post(f"{base}/v1/completions", json=body, headers=CLOSE)
    response.raise_for_status()
    return length / (time.perf_counter() - start)


def measure_round(
    client: httpx.Client, base: str, work: Workload, args: Any, tag: str, vocab: int
) -> dict[str, float]:
    rng = random.Random(tag)
    row = {
        "itl_p50_ms": 1e3 * measure_itl(client, base, args.itl_tokens),
        "ttft_ms": 1e3 * measure_ttft(client, base, args.ttft_requests, tag),
        "workload_tok_s": asyncio.run(_workload(base, work)),
    }
    for length in args.prefill:
        row[f"prefill_{length}_tok_s"] = measure_prefill(client, base, length, rng, vocab)
    return row


def keys(prefill: list[int]) -> tuple[str, ...]:
    return ("itl_p50_ms", "ttft_ms", "workload_tok_s", *(f"prefill_{n}_tok_s" for n in prefill))


TARGETS = {  # measure: (shardline / llama.cpp must be <= or >= this)
    "itl_p50_ms": ("<=", 0.5),
    "ttft_ms": ("<=", 1.0),
    "workload_tok_s": (">=", 5.0),
    f"prefill_{max(PREFILL_LENGTHS)}_tok_s": (">=", 4.0),
}


def report(medians: dict[str, dict[str, float]], keys: tuple[str, ...]) -> dict[str, Any]:
    names = list(medians)
    print(
        f"{'measure (median)':24}"
        + "".join(f"{n:>14}" for n in names)
        + ("       ratio  target" if len(names) == 2 else "")
    )
    verdicts: dict[str, Any] = {}
    for key in keys:
        line = f"{key:24}" + "".join(f"{medians[n][key]:14.1f}" for n in names)
        if len(names) == 2:
            ratio = medians["shardline"][key] / medians["llama.cpp"][key]
            target = TARGETS.get(key)
            met = (
                None
                if target is None
                else (ratio <= target[1] if target[0] == "<=" else ratio >= target[1])
            )
            verdicts[key] = {"ratio": ratio, "target": target, "met": met}
            line += f"{ratio:11.2f}x" + (
                ""
                if target is None
                else f"  {target[0]} {target[1]}x: " + ("met" if met else "NOT met")
            )
        print(line)
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds (medians reported)"
    )
    parser.add_argument("--threads", type=int, default=2, help="threads of each server")
    parser.add_argument("--slots", type=int, default=16, help="llama.cpp's parallel slots")
    parser.add_argument("--num-requests", type=int, default=64, help="requests of the workload")
    parser.add_argument("--itl-tokens", type=int, default=128)
    parser.add_argument("--ttft-requests", type=int, default=5)
    parser.add_argument(
        "--prefill",
        type=lambda text: [int(n) for n in text.split(",")],
        default=list(PREFILL_LENGTHS),
        help="prompt lengths of the prefill measure, comma-separated (at most 8,000)",
    )
    parser.add_argument(
        "--shardline-pythonpath",
        default=None,
        help="run shardline's server from DIR/shardline (another checkout)",
    )
    parser.add_argument(
        "--activations", choices=("float32", "int8"), default="float32",
        help="shardline's SHARDLINE_CPU_ACTIVATIONS (int8: the opt-in int8-activation GEMM)",
    )
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from shardline.model.fetch import GGUF_NAME, resolve_model_path

    model_dir = resolve_model_path(args.model)
    gguf = next(iter(sorted(model_dir.glob("*.gguf"))), model_dir / GGUF_NAME)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    work = make_workload(tokenizer, args.num_requests)
    binary = llama_cpp_server()
    if binary is None:
        print(
            "llama.cpp: no llama-server (benchmarks/build_llama_cpp.sh builds it); its half is skipped"
        )
    servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    try:
        servers["shardline"] = start_shardline(args.model, args.threads, args.shardline_pythonpath,
                                               args.activations)
        if binary is not None:
            servers["llama.cpp"] = start_llama_cpp(binary, gguf, args.threads, args.slots)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
        with httpx.Client(timeout=1800) as client:
            for base in (b for _, b in servers.values()):  # warm-up: a short chat each
                stream_chat(client, base, CHAT, 4)
            for r in range(args.rounds):
                order = list(servers) if r % 2 == 0 else list(reversed(servers))
                for name in order:
                    row = measure_round(
                        client, servers[name][1], work, args, f"{r}-{name}", len(tokenizer)
                    )
                    runs[name].append(row)
                    print(
                        f"round {r + 1} {name:10} "
                        + ", ".join(f"{k} {v:.1f}" for k, v in row.items()),
                        flush=True,
                    )
    finally:
        for proc, _ in servers.values():
            stop_server(proc, 20)
    medians = {
        name: {k: statistics.median(r[k] for r in rows) for k in keys(args.prefill)}
        for name, rows in runs.items()
    }
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load {os.getloadavg()[0]:.2f}; "
        f"{args.threads} threads each; {args.rounds} rounds; model {gguf.name}"
    )
    verdicts = report(medians, keys(args.prefill))
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "runs": runs,
                    "medians": medians,
                    "verdicts": verdicts,
                    "args": {k: str(v) for k, v in vars(args).items()},
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
