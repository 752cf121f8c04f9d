"""Shardline vs llama.cpp's server on a synthetic Llama-3.2-1B-shaped Q4_K_M-like GGUF (issue 23).

The file: Llama-3.2-1B's shapes (hidden 2048, 16 layers, 32 heads / 8 KV heads, intermediate
8192, vocabulary 128256 unless `--vocab` says less, tied embeddings) with random quantized
blocks, typed as llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the embedding table (it is also the
output head) and for attn_v / ffn_down in the layers llama.cpp gives more bits (the first and
last eighth and every third layer between). gguf-py cannot quantize K-quants, so the blocks are
random bytes whose float16 scales are set to bounded values (tests/support/gguf_models.py's
`quantized_bytes`, as the kernel tests' files); the tokenizer is a SentencePiece-style vocabulary of the same size. It is
written to a temporary directory.

Both servers run on the same file with 2 threads and the same KV room (16 slots of 2,304
tokens: `-c 36864 -np 16 --kv-unified` for llama.cpp, 2,304 blocks of 16 and max_model_len
2,304 for shardline, prefix caching off), alternating rounds, each in a fresh process:

* single-stream decode tok/s: a 32-token prompt, 64 tokens with ignore_eos, (tokens - 1) /
  (last token - first token) for shardline; llama.cpp's own `predicted_per_second` (the same
  span);
* 16 streams: 16 such requests at once, generated tokens / wall time;
* 2k prefill: a 2,048-token prompt, one token, prompt tokens / wall time of the request;
* RSS of the server (shardline: engine + worker processes) after these, the context the same:
  at once (`rss_bytes`) and after IDLE_S seconds idle (`rss_idle_bytes`; shardline's worker hands
  a burst's activations back after a second idle, worker/heap.py).

`--measures streams,prefill` runs only those (RSS always). `--activations both` adds a shardline run
with the opt-in int8 activations (SHARDLINE_CPU_ACTIVATIONS=int8) to every round. `--kquants both` runs shardline twice
a round, K-quants by `gguf_gemm` (SHARDLINE_CPU_GGUF_KQUANTS=gguf_gemm) and in the packed GEMM's
integer panels (the default), to compare the two in one run. `--kv-cache-dtype float16` gives
shardline a float16 KV cache, as llama.cpp's default f16 one (default: auto, float32 on CPU).

llama.cpp's server is looked for at `$LLAMA_CPP_HOME/bin/llama-server` (default
~/.cache/shardline/llama.cpp; benchmarks/build_llama_cpp.sh builds it); without it that half is
skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from startup import llama_cpp_server, start_llama_server, stop_server  # noqa: E402
from support.gguf_models import _add_tokenizer, quantized_bytes  # noqa: E402

SHAPE = {"hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "intermediate": 8192}
SLOTS, SLOT_TOKENS = 16, 2304
PROMPT, GEN, PREFILL = 32, 64, 2048
IDLE_S = 2.5  # seconds idle before the second RSS reading (the worker trims after ~1 s idle)


def more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the layers Q4_K_M gives Q6_K attn_v / ffn_down."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def write_model(path: pathlib.Path, vocab: int, seed: int = 0) -> pathlib.Path:
    import gguf

    rng = np.random.default_rng(seed)
    h, layers, heads, kv = SHAPE["hidden"], SHAPE["layers"], SHAPE["heads"], SHAPE["kv_heads"]
    inter, head_dim = SHAPE["intermediate"], h // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("synthetic-llama-3.2-1b-q4_k_m")
    writer.add_context_length(131072)
    writer.add_embedding_length(h)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    _add_tokenizer(writer, vocab, None)

    def add(name: str, rows: int, cols: int, type_name: str) -> None:
        # K-quant blocks are random bytes: only the shape of the values is read (no memory).
        blocks = quantized_bytes(np.broadcast_to(np.float32(0), (rows, cols)), type_name, rng)
        writer.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType[type_name])

    def norm(name: str) -> None:
        writer.add_tensor(name, (1.0 + rng.normal(0, 0.1, size=h)).astype(np.float32))

    add("token_embd.weight", vocab, h, "Q6_K")
    for i in range(layers):
        big = "Q6_K" if more_bits(i, layers) else "Q4_K"
        norm(f"blk.{i}.attn_norm.weight")
        add(f"blk.{i}.attn_q.weight", h, h, "Q4_K")
        add(f"blk.{i}.attn_k.weight", kv * head_dim, h, "Q4_K")
        add(f"blk.{i}.attn_v.weight", kv * head_dim, h, big)
        add(f"blk.{i}.attn_output.weight", h, h, "Q4_K")
        norm(f"blk.{i}.ffn_norm.weight")
        add(f"blk.{i}.ffn_gate.weight", inter, h, "Q4_K")
        add(f"blk.{i}.ffn_up.weight", inter, h, "Q4_K")
        add(f"blk.{i}.ffn_down.weight", h, inter, big)
    norm("output_norm.weight")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def prompts(vocab: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    ids = lambda n: [int(t) for t in rng.integers(300, vocab, size=n)]  # noqa: E731
    return {
        "single": ids(PROMPT),
        "streams": [ids(PROMPT) for _ in range(SLOTS)],
        "prefill": ids(PREFILL),
    }


SHARDLINE_CHILD = textwrap.dedent("""
    import asyncio, json, sys, time
    import psutil
    from shardline import Engine, EngineConfig, SamplingParams

    path, slots, slot_tokens, gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    kv_dtype, idle_s = sys.argv[5], float(sys.argv[6])
    work = json.loads(sys.stdin.read())

    async def run(engine, ids, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        times, n = [], 0
        async for out in engine.generate(ids, params):
            if out.delta_token_ids:
                times.append(time.perf_counter())
                n += len(out.delta_token_ids)
        return n, times

    async def main():
        config = EngineConfig(model=path, num_threads=2, max_model_len=slot_tokens,
                              num_kv_blocks=slots * slot_tokens // 16, max_num_seqs=slots,
                              enable_prefix_caching=False, kv_cache_dtype=kv_dtype)
        async with await Engine.start(config) as engine:
            await run(engine, work["single"][:8], 4)  # warm-up
            result = {}
            if "single" in work["measures"]:
                n, times = await run(engine, work["single"], gen)
                result["single_tok_s"] = (n - 1) / (times[-1] - times[0])
            if "streams" in work["measures"]:
                start = time.perf_counter()
                results = await asyncio.gather(*(run(engine, ids, gen) for ids in work["streams"]))
                result["streams_tok_s"] = sum(r[0] for r in results) / (time.perf_counter() - start)
            if "prefill" in work["measures"]:
                start = time.perf_counter()
                await run(engine, work["prefill"], 1)
                result["prefill_tok_s"] = len(work["prefill"]) / (time.perf_counter() - start)
            me = psutil.Process()

            def rss():
                return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)])

            result["rss_bytes"] = rss()
            await asyncio.sleep(idle_s)
            result["rss_idle_bytes"] = rss()
        print(json.dumps(result))

    asyncio.run(main())
""")


def measure_shardline(path: pathlib.Path, work: dict[str, Any], kv_dtype: str = "auto",
                      kquants: str = "auto", activations: str = "float32") -> dict[str, Any]:
    """One shardline run; `kquants`: SHARDLINE_CPU_GGUF_KQUANTS for it (auto: K-quants in the
    packed GEMM's integer panels; gguf_gemm: in the file's blocks, run by gguf_gemm);
    `activations`: SHARDLINE_CPU_ACTIVATIONS (int8: the opt-in int8-activation GEMM)."""
    proc = subprocess.run(
        [sys.executable, "-c", SHARDLINE_CHILD, str(path), str(SLOTS), str(SLOT_TOKENS), str(GEN),
         kv_dtype, str(IDLE_S)],
        input=json.dumps(work),
        capture_output=True,
        text=True,
        env={**os.environ, "SHARDLINE_CPU_GGUF_KQUANTS": kquants, "SHARDLINE_CPU_ACTIVATIONS": activations},
        timeout=1800,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"shardline child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _post(base: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{base}/completion",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=1800) as r:
        return json.loads(r.read())


def measure_llama_cpp(
    binary: pathlib.Path, path: pathlib.Path, work: dict[str, Any]
) -> dict[str, Any]:
    import psutil

    proc, base = start_llama_server(binary, path, threads=2, context=SLOTS * SLOT_TOKENS, slots=SLOTS)
    try:

        def body(ids: list[int], n: int) -> dict[str, Any]:
            return {
                "prompt": ids,
                "n_predict": n,
                "ignore_eos": True,
                "temperature": 0,
                "cache_prompt": False,
            }

        _post(base, body(work["single"][:8], 4))  # warm-up
        result: dict[str, Any] = {}
        if "single" in work["measures"]:
            timings = _post(base, body(work["single"], GEN))["timings"]
            result["single_tok_s"] = timings["predicted_per_second"]
        if "streams" in work["measures"]:
            counts: list[int] = []

            def one(ids: list[int]) -> None:
                counts.append(_post(base, body(ids, GEN))["timings"]["predicted_n"])

            threads = [threading.Thread(target=one, args=(ids,)) for ids in work["streams"]]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            result["streams_tok_s"] = sum(counts) / (time.perf_counter() - t0)
        if "prefill" in work["measures"]:
            t0 = time.perf_counter()
            _post(base, body(work["prefill"], 1))
            result["prefill_tok_s"] = len(work["prefill"]) / (time.perf_counter() - t0)
        result["rss_bytes"] = psutil.Process(proc.pid).memory_info().rss
        time.sleep(IDLE_S)
        result["rss_idle_bytes"] = psutil.Process(proc.pid).memory_info().rss
        return result
    finally:
        stop_server(proc, 20)


KEYS = ("rss_bytes", "rss_idle_bytes", "single_tok_s", "streams_tok_s", "prefill_tok_s")


def _fmt(key: str, value: float) -> str:
    return f"{value / 2**20:8.0f} MiB" if key.startswith("rss") else f"{value:8.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--vocab", type=int, default=128256, help="vocabulary size (Llama-3.2's: 128256)"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternating rounds (median reported)"
    )
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the results here")
    parser.add_argument(
        "--measures",
        default="single,streams,prefill",
        help="which of single, streams, prefill to run (comma-separated; RSS always)",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        default="auto",
        help="shardline's KV cache dtype (auto = float32 on CPU; float16 is llama.cpp's default f16 cache)",
    )
    parser.add_argument(
        "--kquants",
        choices=("auto", "gguf_gemm", "both"),
        default="auto",
        help="shardline's SHARDLINE_CPU_GGUF_KQUANTS; both: a gguf_gemm run before the auto one "
        "in every round (reported as shardline_gguf_gemm)",
    )
    parser.add_argument(
        "--activations",
        choices=("float32", "int8", "both"),
        default="float32",
        help="shardline's SHARDLINE_CPU_ACTIVATIONS; both: an int8 run after the float32 one in "
        "every round (reported as shardline_int8)",
    )
    args = parser.parse_args(argv)
    measures = args.measures.split(",")
    unknown = sorted(set(measures) - {"single", "streams", "prefill"})
    if unknown:
        parser.error(f"--measures: unknown {', '.join(unknown)} (single, streams, prefill)")
    binary = llama_cpp_server()
    if binary is None:
        print(
            "llama.cpp: no llama-server (benchmarks/build_llama_cpp.sh builds it); its half is skipped"
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = write_model(pathlib.Path(tmp) / "llama-3.2-1b-q4_k_m-synthetic.gguf", args.vocab)
        print(f"file {path.stat().st_size / 2**20:.0f} MiB, vocab {args.vocab}")
        os.environ.setdefault("SHARDLINE_LOG_LEVEL", "WARNING")
        runs: dict[str, list[dict[str, Any]]] = {
            "shardline_gguf_gemm": [], "shardline": [], "shardline_int8": [], "llama_cpp": []}
        # (name, SHARDLINE_CPU_GGUF_KQUANTS, SHARDLINE_CPU_ACTIVATIONS) of the shardline runs
        configs = [("shardline_gguf_gemm", "gguf_gemm", "float32")] if args.kquants == "both" else []
        kq = "auto" if args.kquants == "both" else args.kquants
        if args.activations in ("float32", "both"):
            configs.append(("shardline", kq, "float32"))
        if args.activations in ("int8", "both"):
            configs.append(("shardline_int8" if args.activations == "both" else "shardline", kq, "int8"))
        for r in range(args.rounds):
            work = {**prompts(args.vocab, seed=r), "measures": measures}
            for name, kquants, activations in configs:
                runs[name].append(measure_shardline(path, work, args.kv_cache_dtype, kquants, activations))
                print(name, runs[name][-1], flush=True)
            if binary is not None:
                runs["llama_cpp"].append(measure_llama_cpp(binary, path, work))
                print("llama.cpp", runs["llama_cpp"][-1], flush=True)
    keys = [k for k in KEYS if k.startswith("rss") or k.split("_")[0] in measures]
    print(f"{'':20}" + "".join(f"{k:>16}" for k in keys))
    medians = {
        name: {k: statistics.median(r[k] for r in rows) for k in keys}
        for name, rows in runs.items()
        if rows
    }
    for name, row in medians.items():
        print(f"{name:20}" + "".join(f"{_fmt(k, row[k]):>16}" for k in keys))
    if args.json is not None:
        args.json.write_text(
            json.dumps({"runs": runs, "medians": medians, "vocab": args.vocab}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
