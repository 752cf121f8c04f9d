"""The engine requests behind one HTTP request, read as one stream of (choice index, output).

A completions request with a list of prompts is one engine request per prompt (each submitted
at once, so the scheduler batches them); `n` choices of one prompt are one engine request whose
outputs carry `RequestOutput.index` (the engine fans it out, the choices sharing the prompt's
KV blocks). OpenAI numbers the choices prompt by prompt: choice `prompt_index * n + index`.

One prompt is read in the caller's task, one output per `__anext__` as before. Several are
read by one pending asyncio task each, merged as they come; every task is cancelled, and every
unfinished engine request aborted, by `aclose`, so a client hanging up frees all their KV blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import anyio

from shardline.engine.request import RequestOutput, TokenLogprob
from shardline.engine.server.errors import APIError


@dataclass
class PromptRun:
    """One engine request: a prompt and its `n` choices."""

    index: int
    request_id: str
    outputs: AsyncIterator[RequestOutput]
    remaining: int  # choices not finished yet
    num_prompt_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    pending: asyncio.Future[RequestOutput | None] | None = field(default=None, repr=False)

    def record(self, out: RequestOutput) -> None:
        self.num_prompt_tokens = out.num_prompt_tokens
        if out.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            self.remaining -= 1


async def _next_or_none(outputs: AsyncIterator[RequestOutput]) -> RequestOutput | None:
    try:
        return await outputs.__anext__()
    except StopAsyncIteration:
        return None


def _ended_early() -> APIError:
    return APIError(500, "the engine ended the request before it finished", type="server_error")


class ChoiceOutputs:
    """The outputs of `runs` as (choice index, output); see the module docstring.

    `start()` waits for every prompt's first output, so what the engine refuses (a bad
    parameter, a prompt too long, a full queue) is raised before any answer is sent;
    `failed_prompt` then names the prompt at fault.
    """

    def __init__(
        self, runs: list[PromptRun], *, n: int, abort: Callable[[str], Awaitable[None]]
    ) -> None:
        self.runs = runs
        self.n = n
        self._abort = abort
        self.failed_prompt: int | None = None

    def _choice(self, run: PromptRun, out: RequestOutput) -> tuple[int, RequestOutput]:
        run.record(out)
        return run.index * self.n + out.index, out

    async def start(self) -> list[tuple[int, RequestOutput]]:
        """Each prompt's first output, in prompt order."""
        if len(self.runs) == 1:
            run = self.runs[0]
            try:
                first = await _next_or_none(run.outputs)
            except Exception:
                self.failed_prompt = 0
                raise
            if first is None:
                raise APIError(
                    500, "the engine ended the request without output", type="server_error"
                )
            return [self._choice(run, first)]
        for run in self.runs:
            run.pending = asyncio.ensure_future(_next_or_none(run.outputs))
        await asyncio.wait([run.pending for run in self.runs if run.pending is not None])
        firsts = []
        for run in self.runs:
            task, run.pending = run.pending, None
            assert task is not None
            try:
                first = task.result()
            except Exception:
                self.failed_prompt = run.index
                self._retrieve_all()
                raise
            if first is None:
                raise APIError(
                    500, "the engine ended a request without output", type="server_error"
                )
            firsts.append(self._choice(run, first))
        return firsts

    def _retrieve_all(self) -> None:
        """Mark the other prompts' finished first outputs as seen (no "never retrieved" logs)."""
        for run in self.runs:
            task, run.pending = run.pending, None
            if task is not None and task.done() and not task.cancelled():
                task.exception()

    def __aiter__(self) -> ChoiceOutputs:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        """The next output of any prompt; StopAsyncIteration once every choice finished."""
        live = [run for run in self.runs if run.remaining > 0]
        if not live:
            raise StopAsyncIteration
        if len(self.runs) == 1:
            out = await _next_or_none(live[0].outputs)
            if out is None:
                raise _ended_early()
            return self._choice(live[0], out)
        for run in live:
            if run.pending is None:
                run.pending = asyncio.ensure_future(_next_or_none(run.outputs))
        done, _ = await asyncio.wait(
            [run.pending for run in live if run.pending is not None],
            return_when=asyncio.FIRST_COMPLETED,
        )
        run = next(run for run in live if run.pending in done)
        task, run.pending = run.pending, None
        assert task is not None
        out = task.result()
        if out is None:
            raise _ended_early()
        return self._choice(run, out)

    async def aclose(self) -> None:
        """Stop reading: cancel the pending reads, abort every unfinished engine request, close
        every stream. Shielded: it runs while the client's task is being cancelled, and the
        abort is what frees the requests' KV blocks."""
        with anyio.CancelScope(shield=True):
            pending = [run.pending for run in self.runs if run.pending is not None]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
            self._retrieve_all()
            for run in self.runs:
                try:
                    if run.remaining > 0:
                        await self._abort(run.request_id)
                finally:
                    aclose = getattr(run.outputs, "aclose", None)
                    if aclose is not None:
                        await aclose()
