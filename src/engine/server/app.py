"""`build_app`: the OpenAI-compatible FastAPI application around a running engine.

    app = build_app(engine, served_model_name="smollm2-135m-instruct", api_key=None)

The app does not own the engine: whoever built it starts and closes it (the `serve`
command does so in the app's lifespan, see `engine.server.launch`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shardline import __version__
from shardline.engine.server.engine_protocol import EngineLike
from shardline.engine.server.errors import APIError, install_error_handlers
from shardline.engine.server.http_limits import DEFAULT_BODY_TIMEOUT_S
from shardline.engine.server.metrics import ServerMetrics
from shardline.engine.server.middleware import (
    DEFAULT_MAX_BODY_BYTES,
    GatekeeperMiddleware,
    api_key_bytes,
)
from shardline.engine.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from shardline.engine.server.sampling import TOKENIZE_OFF_LOOP_CHARS
from shardline.engine.server.serving import OpenAIServing
from shardline.engine.server.streaming import ClientGone
from shardline.engine.server.tools import DEFAULT_TOOL_CALL_PARSER
from shardline.engine.server.ui import UI_PATHS, install_ui
from shardline.engine.tool_parsers import get_tool_parser

# With an API key set, only these (and the chat page's static files) answer without it: the
# metrics and the API docs describe the deployment, so a scraper sends the key as a bearer token
# (Prometheus: `authorization: {credentials: KEY}`).
PUBLIC_PATHS = ("/health",)

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "Invalid parameters, malformed body, or a prompt over the context length"),
        (401, "Missing or wrong API key"),
        (404, "Unknown model"),
        (408, "The request body did not arrive in time"),
        (413, "Request body too large"),
        (429, "Engine overloaded; retry later"),
        (503, "Engine not running"),
    )
}


class _CountResponses:
    """ASGI wrapper counting API responses by path and status (401/413 included)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        path = scope["path"]

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count_response(path, int(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


@dataclass(frozen=True)
class CORSSettings:
    """Cross-origin requests (as vLLM's --allowed-origins, --allowed-methods, --allowed-headers,
    --allow-credentials): browsers on these origins may call the API; "*" allows any."""

    allowed_origins: tuple[str, ...]
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False


DEFAULT_MAX_LOGPROBS = 20


def build_app(
    engine: EngineLike | None,
    *,
    served_model_name: str | Sequence[str],
    api_key: str | None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout_s: float | None = DEFAULT_BODY_TIMEOUT_S,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
    engine_getter: Callable[[], EngineLike] | None = None,
    max_logprobs: int = DEFAULT_MAX_LOGPROBS,
    cors: CORSSettings | None = None,
    ui: bool = True,
    tool_call_parser: str = DEFAULT_TOOL_CALL_PARSER,
) -> FastAPI:
    """The HTTP app serving `engine` under the name `served_model_name` (or names: the first
    is the one responses report, /v1/models lists them all, a request may name any).

    `api_key` (if set) is required as `Authorization: Bearer <key>` on every `/v1` route,
    the key's UTF-8 bytes (ValueError here for a key that has none). A request body must
    arrive within `body_timeout_s` of its headers (408 otherwise; None: no limit).
    `engine_getter`, when given, is asked for the engine on each request instead (the serve
    command starts the engine inside the app's `lifespan`, after the app exists); `engine` is
    then ignored and may be None. A request asking for more log-probabilities per token than
    `max_logprobs` (-1: no cap here; the engine caps at the vocabulary) gets a 400 naming its
    field. `cors` (default: none) answers browsers' cross-origin requests and preflights.
    `ui` serves the chat page at `/` (engine.server.ui; open without the key, which the page
    asks for); False: `/` is 404, as vLLM's. `tool_call_parser` reads `tool_choice="auto"`
    answers (`tool_parsers.TOOL_PARSERS`; ValueError here for an unknown name).
    """
    get_tool_parser(tool_call_parser)
    served_model_names = (served_model_name,) if isinstance(served_model_name, str) else tuple(served_model_name)
    if not served_model_names:
        raise ValueError("build_app needs at least one served model name")
    served_model_name = served_model_names[0]
    if engine is None and engine_getter is None:
        raise ValueError("build_app needs an engine or an engine_getter")
    # Refuse settings now: the middleware is built at the first request.
    api_key_bytes(api_key)
    if body_timeout_s is not None and not body_timeout_s > 0:
        raise ValueError(f"body_timeout_s must be > 0, got {body_timeout_s}")
    metrics = ServerMetrics(lambda: current_engine(), model_name=served_model_name)
    app = FastAPI(
        title="shardline",
        summary="OpenAI-compatible API of a shardline engine",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    install_error_handlers(app)

    def current_engine() -> EngineLike:
        if engine_getter is not None:
            return engine_getter()
        assert engine is not None  # checked above
        return engine

    def serving() -> OpenAIServing:
        return OpenAIServing(current_engine(), served_model_name=served_model_names, tool_call_parser=tool_call_parser)

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        # Nobody is listening; 499 (nginx's "client closed request") shows up in the metrics.
        return Response(status_code=499)

    app.add_exception_handler(ClientGone, on_client_gone)

    @app.get("/health", responses={503: _ERROR_RESPONSES[503]})
    async def health() -> Response:
        """200 while the engine runs, 503 once it is dead."""
        if current_engine().is_dead:
            return APIError(503, "engine is not running", code="engine_dead").response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics_endpoint(request: Request) -> Response:
        """Prometheus metrics under vLLM's names (`shardline:` for `vllm:`; docs/METRICS.md), process metrics
        included; the format the scraper's Accept header asks for (text, or OpenMetrics)."""
        body, content_type = metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    @app.get("/v1/models", response_model=ModelList, responses={401: _ERROR_RESPONSES[401]})
    async def list_models() -> ModelList:
        """The model this server serves, once under each of its names."""
        max_model_len = current_engine().max_model_len
        return ModelList(data=[ModelCard(id=name, max_model_len=max_model_len) for name in served_model_names])

    def check_model(name: str | None) -> None:
        if name is not None and name not in served_model_names:
            served = "', '".join(served_model_names)
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{served}'",
                           param="model", code="model_not_found")

    def check_logprobs(body: ChatCompletionRequest | CompletionRequest) -> None:
        if max_logprobs < 0:
            return
        for name in ("logprobs", "top_logprobs", "prompt_logprobs"):
            value = getattr(body, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > max_logprobs:
                raise APIError(400, f"{name} may be at most {max_logprobs} (the server's --max-logprobs), got {value}",
                               param=name, code="invalid_value")

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={401: _ERROR_RESPONSES[401], 404: {}})
    async def retrieve_model(model_id: str) -> ModelCard:
        """One model (the official client's `models.retrieve`): this server's, or 404."""
        check_model(model_id)
        return ModelCard(id=model_id, max_model_len=current_engine().max_model_len)

    @app.get("/version")
    async def version() -> dict[str, str]:
        """The server's shardline version."""
        return {"version": __version__}

    @app.get("/ping", responses={503: _ERROR_RESPONSES[503]})
    async def ping() -> Response:
        """`/health` under the name load balancers (and vLLM's SageMaker route) probe."""
        return await health()

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        """The token ids the engine would see for a text `prompt` or chat `messages`."""
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
        eng = current_engine()
        text = body.prompt if body.prompt is not None else "".join(
            str(m.get("content", "")) for m in body.messages or [])
        if len(text) > eng.max_prompt_chars:
            raise APIError(400, f"the input has {len(text)} characters; more than this model's context "
                           f"can hold ({eng.max_prompt_chars})", param="messages" if body.messages else "prompt",
                           code="context_length_exceeded")
        tokenizer = eng.tokenizer

        def run() -> list[int]:
            if body.prompt is not None:
                return [int(t) for t in tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)]
            ids = tokenizer.apply_chat_template(body.messages, add_generation_prompt=body.add_generation_prompt,
                                                tokenize=True)
            return [int(t) for t in (ids["input_ids"] if hasattr(ids, "keys") else ids)]

        try:
            tokens = await anyio.to_thread.run_sync(run) if len(text) > TOKENIZE_OFF_LOOP_CHARS else run()
        except APIError:
            raise
        except Exception as exc:  # a chat template's own error, odd roles...
            raise APIError(400, f"cannot tokenize: {exc}", param="messages" if body.messages else "prompt") from exc
        return TokenizeResponse(count=len(tokens), max_model_len=eng.max_model_len, tokens=tokens)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        """The text of token ids."""
        check_model(body.model)
        eng = current_engine()
        vocab = len(eng.tokenizer) if hasattr(eng.tokenizer, "__len__") else getattr(eng.tokenizer, "vocab_size", None)
        bad = [t for t in body.tokens if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise APIError(400, f"token ids outside the vocabulary (0..{vocab}): {bad[:5]}", param="tokens")
        if len(body.tokens) > TOKENIZE_OFF_LOOP_CHARS:
            text = await anyio.to_thread.run_sync(eng.tokenizer.decode, body.tokens)
        else:
            text = eng.tokenizer.decode(body.tokens)
        return DetokenizeResponse(prompt=text)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Chat completion; `stream: true` answers with server-sent events."""
        check_logprobs(body)
        return await serving().chat(body, request)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Text completion; `stream: true` answers with server-sent events."""
        check_logprobs(body)
        return await serving().completion(body, request)

    api_paths = frozenset({"/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"})
    if ui:
        install_ui(app)
    app.add_middleware(GatekeeperMiddleware, api_key=api_key, max_body_bytes=max_body_bytes,
                       public_paths=PUBLIC_PATHS + (UI_PATHS if ui else ()), body_timeout_s=body_timeout_s)
    app.add_middleware(_CountResponses, metrics=metrics, paths=api_paths)
    if cors is not None:  # outermost: a preflight carries no API key and is answered here
        app.add_middleware(CORSMiddleware, allow_origins=list(cors.allowed_origins),
                           allow_methods=list(cors.allowed_methods), allow_headers=list(cors.allowed_headers),
                           allow_credentials=cors.allow_credentials)
    return app

