"""An in-process stand-in for `engine.Engine`, for testing the HTTP layer alone.

It implements the same API (docs/INTERFACES.md section 4) with a byte-level tokenizer and a
fixed, deterministic continuation, and it validates requests with the engine's own
`validate_request`, so the errors it raises are the real ones. It is a test double for the
server only; end-to-end tests use the real engine.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator, Sequence

from shardline.engine.core import EngineStats
from shardline.engine.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError
from shardline.engine.request import RequestOutput, SamplingParams, TokenLogprob, validate_request

CONTINUATION = "The quick brown fox jumps over the lazy dog. "
BLOCK_SIZE = 4


class ByteTokenizer:
    """One token per UTF-8 byte; a tiny chat template in the shape of ChatML."""

    vocab_size = 256

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: Sequence[int]) -> str:
        return bytes(token_ids).decode("utf-8", errors="replace")

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True, tokenize: bool = True
    ) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<assistant>"
        return self.encode(text)


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
                 max_running: int = 1000) -> None:
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
        self.closed = False

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

    async def chat(
        self, messages: list[dict[str, str]], params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        token_ids = self.tokenizer.apply_chat_template(messages)
        async for out in self._run(token_ids, params or SamplingParams(), request_id or uuid.uuid4().hex):
            yield out

    async def _run(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        if self._dead:
            raise EngineDeadError("engine is not running")
        validate_request(prompt_ids, params, max_model_len=self.max_model_len, vocab_size=ByteTokenizer.vocab_size)
        if len(self._live) >= self.max_running:
            raise EngineOverloadedError(f"{len(self._live)} requests already running")
        self.last_params = params
        self._live[request_id] = len(prompt_ids)
        self.stats_data.prompt_tokens += len(prompt_ids)
        text = ""
        token_ids: list[int] = []
        reason: str | None = None
        try:
            while reason is None:
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                else:
                    await asyncio.sleep(0)
                if self._dead:
                    raise EngineDeadError("engine died while generating")
                if request_id in self._aborted:
                    reason = "abort"
                    yield self._output(request_id, "", text, [], token_ids, None, reason, prompt_ids)
                    return
                char = CONTINUATION[len(token_ids) % len(CONTINUATION)]
                token_id = ord(char)
                token_ids.append(token_id)
                self._live[request_id] += 1
                self.stats_data.generation_tokens += 1
                delta = char
                candidate = text + char
                for s in params.stop:
                    if s in candidate:
                        delta = candidate[: candidate.index(s)][len(text):]
                        candidate = candidate[: candidate.index(s)]
                        reason = "stop"
                        break
                text = candidate
                if reason is None and len(token_ids) >= params.max_tokens:
                    reason = "length"
                logprobs = None
                if params.logprobs is not None:
                    top = [(token_id, -0.5), *[(ord("a") + i, -1.0 - i) for i in range(params.logprobs)]][: params.logprobs]
                    logprobs = [TokenLogprob(token_id=token_id, logprob=-0.5, top=top)]
                yield self._output(request_id, delta, text, [token_id], token_ids, logprobs, reason, prompt_ids)
        finally:
            self._live.pop(request_id, None)
            self._aborted.discard(request_id)
            final = reason or "abort"
            self.stats_data.requests_finished[final] = self.stats_data.requests_finished.get(final, 0) + 1

    @staticmethod
    def _output(request_id: str, delta: str, text: str, delta_ids: list[int], token_ids: list[int],
                logprobs: list[TokenLogprob] | None, reason: str | None, prompt_ids: list[int]) -> RequestOutput:
        return RequestOutput(
            request_id=request_id, delta=delta, text=text, delta_token_ids=delta_ids,
            token_ids=list(token_ids), logprobs=logprobs, finished=reason is not None,
            finish_reason=reason, num_prompt_tokens=len(prompt_ids), num_output_tokens=len(token_ids),
        )
