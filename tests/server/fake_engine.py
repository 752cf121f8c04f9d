"""An in-process stand-in for `engine.Engine`, for testing the HTTP layer alone.

It implements the same API (docs/INTERFACES.md section 4) with a byte-level tokenizer and a
fixed, deterministic continuation, and it validates requests with the engine's own
`validate_request`, so the errors it raises are the real ones. It is a test double for the
server only; end-to-end tests use the real engine.
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shardline.engine.core import EngineStats
from shardline.engine.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError
from shardline.engine.model_info import chat_template_options
from shardline.engine.request import RequestOutput, SamplingParams, TokenLogprob, validate_request
from shardline.engine.structured_output import GrammarCompiler, StructuredOutputSpec

CONTINUATION = "The quick brown fox jumps over the lazy dog. "
BLOCK_SIZE = 4


class ByteTokenizer:
    """One token per UTF-8 byte; a tiny chat template in the shape of ChatML that shows what a
    real one reads: tool calls, tool call ids, template variables (`chat_template_kwargs`),
    and the open last message of `continue_final_message`."""

    vocab_size = 256

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return bytes(token_ids).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, **variables: Any) -> str:
        text = "".join(f"[{name}={value}]" for name, value in sorted(variables.items()))
        for i, m in enumerate(messages):
            text += f"<{m['role']}>{m['content']}"
            for call in m.get("tool_calls", ()):
                text += f"<call {call['function']['name']}({json.dumps(call['function']['arguments'])})>"
            if "tool_call_id" in m:
                text += f"<for {m['tool_call_id']}>"
            if not (continue_final_message and i == len(messages) - 1):
                text += "\n"
        if add_generation_prompt:
            text += "<assistant>"
        return text

    def apply_chat_template(self, messages: list[dict[str, Any]], tokenize: bool = True, **options: Any) -> Any:
        text = self.render_chat(messages, **options)
        return self.encode(text) if tokenize else text


def expected_text(max_tokens: int, stop: Sequence[str] = ()) -> str:
    """What the fake generates for `max_tokens` tokens (before any stop string)."""
    text = (CONTINUATION * (max_tokens // len(CONTINUATION) + 1))[:max_tokens]
    for s in stop:
        if s in text:
            text = text[: text.index(s)]
    return text


class FakeEngine:
    """Deterministic engine double: one character of CONTINUATION per token.

    `token_delay` paces tokens (so a test can disconnect mid-stream); `max_running` makes the
    next request fail with EngineOverloadedError; `kill()` makes it dead.
    """

    def __init__(self, *, max_model_len: int = 256, num_kv_blocks: int = 64, token_delay: float = 0.0,
                 max_running: int = 1000, grammar_compiler: GrammarCompiler | None = None) -> None:
        self.tokenizer = ByteTokenizer()
        self.model_name = "fake-model"
        self.max_model_len = max_model_len
        self.num_kv_blocks = num_kv_blocks
        self.token_delay = token_delay
        self.max_running = max_running
        self._dead = False
        self._live: dict[str, int] = {}  # request id -> tokens holding KV
        self._aborted: set[str] = set()
        self.aborted_ids: list[str] = []
        self.stats_data = EngineStats(num_kv_blocks_total=num_kv_blocks)
        self.last_params: SamplingParams | None = None
        self.params_seen: list[SamplingParams] = []  # every request's, in submission order
        self.last_chat_template_kwargs: Mapping[str, Any] | None = None
        self.last_tools: list[dict[str, Any]] | None = None
        self.last_messages: list[dict[str, Any]] | None = None
        self.closed = False
        # `script`: what every choice writes instead of CONTINUATION, ending with "stop" once
        # written (a test forcing the model's output, e.g. a tool call to parse).
        self.script: str | None = None
        # Compiles structured-output specs as the engine does (a real GrammarCompiler, on any
        # tokenizer) when given; else `compile_grammar` only records them.
        self.grammar_compiler = grammar_compiler
        self.compiled: list[StructuredOutputSpec] = []

    @property
    def max_prompt_chars(self) -> int:
        """As Engine's: a character is at least one byte, one token each here, so a text
        longer than max_model_len characters cannot fit."""
        return self.max_model_len

    @property
    def is_dead(self) -> bool:
        return self._dead

    def kill(self) -> None:
        """Simulate a dead engine: every new or live request fails with EngineDeadError."""
        self._dead = True

    def revive(self) -> None:
        self._dead = False

    async def aclose(self) -> None:
        """Like Engine.aclose: idempotent; the engine is dead afterwards."""
        self._dead = True
        self.closed = True

    def stats(self) -> EngineStats:
        s = self.stats_data
        s.num_running = len(self._live)
        s.num_kv_blocks_used = sum(math.ceil(n / BLOCK_SIZE) for n in self._live.values())
        return s

    async def abort(self, request_id: str) -> None:
        if request_id in self._live:
            self._aborted.add(request_id)
            self.aborted_ids.append(request_id)

    async def generate(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        elif all(isinstance(t, int) for t in prompt):
            token_ids = list(prompt)
        else:
            raise InvalidRequestError("prompt", "must be a string or a list of token ids")
        async for out in self._run(token_ids, params or SamplingParams(), request_id or uuid.uuid4().hex):
            yield out

    async def compile_grammar(self, spec: StructuredOutputSpec) -> Any:
        self.compiled.append(spec)
        if self.grammar_compiler is None:
            return None
        return self.grammar_compiler.compile(spec)  # InvalidRequestError naming spec.field

    async def chat(
        self, messages: list[dict[str, Any]], params: SamplingParams | None = None, request_id: str | None = None,
        *, chat_template_kwargs: Mapping[str, Any] | None = None, tools: list[dict[str, Any]] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        self.last_chat_template_kwargs = chat_template_kwargs
        self.last_tools = tools
        self.last_messages = messages
        options = chat_template_options(chat_template_kwargs)
        if tools is not None:
            options["tools"] = tools
        token_ids = self.tokenizer.apply_chat_template(messages, **options)
        async for out in self._run(token_ids, params or SamplingParams(), request_id or uuid.uuid4().hex):
            yield out

    async def _run(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        """The choices of `params.n`, one character each per step, interleaved as the engine
        interleaves them (each output carries its `index`); choice j starts j characters into
        CONTINUATION, so choices differ and choice 0 is `expected_text`."""
        if self._dead:
            raise EngineDeadError("engine is not running")
        validate_request(prompt_ids, params, max_model_len=self.max_model_len, vocab_size=ByteTokenizer.vocab_size)
        if len(self._live) >= self.max_running:
            raise EngineOverloadedError(f"{len(self._live)} requests already running")
        self.last_params = params
        self.params_seen.append(params)
        self._live[request_id] = len(prompt_ids)
        self.stats_data.prompt_tokens += len(prompt_ids)
        choices = [_Choice(index=j) for j in range(params.n)]
        prompt_logprobs = self._prompt_logprobs(prompt_ids, params.prompt_logprobs)
        try:
            while live := [c for c in choices if c.reason is None]:
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                else:
                    await asyncio.sleep(0)
                if self._dead:
                    raise EngineDeadError("engine died while generating")
                for choice in live:
                    if request_id in self._aborted:
                        choice.reason = "abort"
                        yield self._output(request_id, "", choice, [], None, prompt_ids)
                        continue
                    yield self._step(request_id, choice, params, prompt_ids,
                                     prompt_logprobs if not choice.token_ids else None)
        finally:
            self._live.pop(request_id, None)
            self._aborted.discard(request_id)
            for choice in choices:
                final = choice.reason or "abort"
                self.stats_data.requests_finished[final] = self.stats_data.requests_finished.get(final, 0) + 1

    def _step(self, request_id: str, choice: _Choice, params: SamplingParams, prompt_ids: list[int],
              prompt_logprobs: list[TokenLogprob | None] | None) -> RequestOutput:
        if self.script is not None:
            char = self.script[len(choice.token_ids)]
        else:
            char = CONTINUATION[(len(choice.token_ids) + choice.index) % len(CONTINUATION)]
        token_id = ord(char)
        choice.token_ids.append(token_id)
        self._live[request_id] += 1
        self.stats_data.generation_tokens += 1
        candidate = choice.text + char
        delta = char
        if len(choice.token_ids) > params.min_tokens:  # no stop string before min_tokens (vLLM)
            for s in params.stop:
                at = candidate.find(s, max(0, len(choice.text) - len(s) + 1))  # in the new text only
                if at >= 0:
                    candidate = candidate[: at + (len(s) if params.include_stop_str_in_output else 0)]
                    delta = candidate[len(choice.text):]
                    choice.reason = "stop"
                    break
        choice.text = candidate
        if choice.reason is None and self.script is not None and len(choice.token_ids) == len(self.script):
            choice.reason = "stop"
        if choice.reason is None and len(choice.token_ids) >= params.max_tokens:
            choice.reason = "length"
        logprobs = None
        if params.logprobs is not None:
            top = [(token_id, -0.5), *[(ord("a") + i, -1.0 - i) for i in range(params.logprobs)]][: params.logprobs]
            logprobs = [TokenLogprob(token_id=token_id, logprob=-0.5, top=top)]
        out = self._output(request_id, delta, choice, [token_id], logprobs, prompt_ids)
        out.prompt_logprobs = prompt_logprobs
        return out

    @staticmethod
    def _prompt_logprobs(prompt_ids: list[int], k: int | None) -> list[TokenLogprob | None] | None:
        """Made-up prompt logprobs in the engine's shape: None first, then the prompt token at
        -1.0 and the top k (ids 97, 98, ... at -0.25, -0.5, ...)."""
        if k is None:
            return None
        return [None, *(TokenLogprob(token_id=t, logprob=-1.0, top=[(97 + i, -0.25 * (i + 1)) for i in range(k)])
                        for t in prompt_ids[1:])]

    @staticmethod
    def _output(request_id: str, delta: str, choice: _Choice, delta_ids: list[int],
                logprobs: list[TokenLogprob] | None, prompt_ids: list[int]) -> RequestOutput:
        return RequestOutput(
            request_id=request_id, delta=delta, text=choice.text, delta_token_ids=delta_ids,
            token_ids=list(choice.token_ids), logprobs=logprobs, finished=choice.reason is not None,
            finish_reason=choice.reason, num_prompt_tokens=len(prompt_ids), num_output_tokens=len(choice.token_ids),
            index=choice.index,
        )


@dataclass
class _Choice:
    """One choice of a fake request."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    reason: str | None = None
