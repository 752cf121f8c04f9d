"""`shardline serve`: uvicorn with the engine started in the app's lifespan.

The engine runs inside uvicorn's own event loop (`await Engine.start(...)` in the lifespan),
so requests and the engine share one loop and no thread hop. SIGINT/SIGTERM shut down
gracefully (open streams get a few seconds, then the engine closes its workers) and the
process exits 0; an engine that dies for good makes the process exit 1, so a supervisor
restarts it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass
from typing import Literal

import anyio
import uvicorn
from fastapi import FastAPI

from shardline.engine.config import EngineConfig
from shardline.engine.server.app import CORSSettings, build_app
from shardline.engine.server.engine_protocol import EngineLike
from shardline.engine.server.http_limits import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    guarded_h11_protocol,
)
from shardline.engine.server.middleware import DEFAULT_MAX_BODY_BYTES

log = logging.getLogger("shardline.serve")

EXIT_OK = 0
EXIT_ENGINE_FAILED = 1
ENGINE_WATCH_PERIOD_S = 0.5
GRACEFUL_SHUTDOWN_S = 5
ENGINE_DEAD_LINGER_S = 1.0


@dataclass
class ServeOptions:
    """Where and how to listen (the engine's own knobs are in EngineConfig)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    """A request's headers must be in this many seconds after connecting (or after the
    previous response, on a kept-alive connection); else 408 and close."""
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    """A request's whole body must be in this many seconds after its headers; else 408."""
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    """Open HTTP connections at most; one more is answered 503 and closed."""
    access_log: bool = False
    log_level: str = "info"
    """uvicorn's log level (--uvicorn-log-level)."""
    cors: CORSSettings | None = None
    """Cross-origin requests allowed (--allowed-origins ...); None: no CORS headers."""
    ui: bool = True
    """The chat page at `/` (--no-ui: off, `/` is 404)."""
    tool_call_parser: str = "hermes"
    """The parser of `tool_choice="auto"` answers (--tool-call-parser)."""


class _Server(uvicorn.Server):
    """uvicorn's server, minus re-raising the caught signal after shutdown.

    uvicorn re-delivers SIGTERM to itself once it has shut down, so the process dies of the
    signal (exit 143); a clean, requested shutdown should exit 0.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        try:
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: signals are the embedding program's business
            yield
            return
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


class _Holder:
    """The engine and the outcome, shared between the lifespan, the routes and `serve`."""

    def __init__(self) -> None:
        self.engine: EngineLike | None = None
        self.start_failed = False
        self.engine_died = False
        self.server: uvicorn.Server | None = None

    def get(self) -> EngineLike:
        if self.engine is None:  # routes run only after the lifespan started the engine
            raise RuntimeError("engine not started")
        return self.engine


def served_names_for(config: EngineConfig) -> tuple[str, ...]:
    """The names clients use, the reported one first: --served-model-name's, else the model's
    name or directory name."""
    import pathlib

    if config.served_model_names:
        return config.served_model_names
    path = pathlib.Path(config.model)
    return (path.resolve().name if path.exists() else config.model,)


def build_server_app(config: EngineConfig, options: ServeOptions, holder: _Holder) -> FastAPI:
    """The app whose lifespan starts `config`'s engine and closes it on shutdown."""
    from shardline.engine.api import Engine

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            engine = await Engine.start(config)
        except BaseException:
            holder.start_failed = True
            log.exception("engine failed to start")
            raise
        holder.engine = engine
        stats = engine.stats()
        log.info(
            "model %s (max_model_len %d) | tensor-parallel %d, pipeline-parallel %d, data-parallel %d, "
            "transport %s, device %s, dtype %s | KV cache %d blocks x %d tokens",
            engine.model_name, engine.max_model_len, config.tensor_parallel_size,
            config.pipeline_parallel_size, config.data_parallel_size, config.transport, config.device,
            config.torch_dtype_name,
            stats.num_kv_blocks_total, config.block_size,
        )
        log.info("serving %s on http://%s:%d (OpenAI API under /v1%s)%s", " = ".join(map(repr, served_names_for(config))),
                 options.host, options.port, "; chat page at /" if options.ui else "",
                 "; API key required" if options.api_key else "")
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_engine, engine, holder)
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()
        finally:
            log.info("shutting down the engine")
            await engine.aclose()

    return build_app(
        None,
        served_model_name=served_names_for(config),
        api_key=options.api_key,
        max_body_bytes=options.max_body_bytes,
        body_timeout_s=options.body_timeout_s,
        lifespan=lifespan,
        engine_getter=holder.get,
        max_logprobs=config.max_logprobs,
        cors=options.cors,
        ui=options.ui,
        tool_call_parser=options.tool_call_parser,
    )


async def _watch_engine(engine: EngineLike, holder: _Holder) -> None:
    """Stop the server once the engine is dead for good (it restarts failed workers itself)."""
    while not engine.is_dead:  # noqa: ASYNC110 - Engine exposes a flag; 0.5 s is plenty
        await anyio.sleep(ENGINE_WATCH_PERIOD_S)
    log.critical("the engine died; stopping the server so a supervisor can restart it")
    holder.engine_died = True
    # A moment in which /health answers 503 (not a refused connection), so a load balancer's
    # probe learns why this instance went away.
    await anyio.sleep(ENGINE_DEAD_LINGER_S)
    if holder.server is not None:
        holder.server.should_exit = True


def uvicorn_config(app: FastAPI, options: ServeOptions, *, lifespan: Literal["on", "off"] = "on") -> uvicorn.Config:
    """uvicorn's settings for `app`: h11 with the header timeout and connection cap of
    `options` (`http_limits`), no websockets, a bounded graceful shutdown."""
    return uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level=options.log_level,
        log_config=None,  # uvicorn's records go to the root logger, in shardline's one format
        access_log=options.access_log,
        lifespan=lifespan,
        ws="none",
        http=guarded_h11_protocol(header_timeout_s=options.header_timeout_s,
                                  max_connections=options.max_connections),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


FD_HEADROOM = 256  # descriptors beyond the HTTP connections: workers' pipes, shared memory, logs


def _raise_fd_limit(max_connections: int) -> None:
    """Raise the soft open-file limit towards the hard one so `max_connections` connections fit
    (a server out of descriptors cannot even accept a health check); warn if they cannot."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    needed = max_connections + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("the open-file limit (%d) leaves too few descriptors for --max-connections %d; "
                    "raise `ulimit -n` or lower --max-connections", soft, max_connections)


def serve(config: EngineConfig, options: ServeOptions) -> int:
    """Run the server until SIGINT/SIGTERM (returns 0) or a fatal engine error (returns 1)."""
    _raise_fd_limit(options.max_connections)
    holder = _Holder()
    app = build_server_app(config, options, holder)
    server = _Server(uvicorn_config(app, options))
    holder.server = server
    try:
        server.run()
    except SystemExit:  # uvicorn's way of saying the lifespan (engine start) failed
        return EXIT_ENGINE_FAILED
    if holder.start_failed or not server.started:
        return EXIT_ENGINE_FAILED
    if holder.engine_died:
        return EXIT_ENGINE_FAILED
    log.info("stopped cleanly")
    return EXIT_OK
