"""LLM: the offline batch API. Runs an Engine on a private event loop in a background thread.

    llm = LLM(EngineConfig(model="smollm2-135m-instruct"))
    outputs = llm.generate(["Hello", "Why is the sky blue?"], SamplingParams(max_tokens=32))
    llm.close()

Each prompt gives one `GenerateResult`: the request's final `RequestOutput` (choice 0's),
whose `outputs` lists the final output of every choice (`SamplingParams.n`), by index.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal
from tqdm import tqdm

from shardline.engine.api import Engine
from shardline.engine.config import EngineConfig
from shardline.engine.request import RequestOutput, SamplingParams


@dataclass(slots=True)
class GenerateResult(RequestOutput):
    """What `LLM.generate` returns for one prompt: choice 0's final output (its fields, so
    `.text`, `.token_ids` and `.finish_reason` read as with n=1) plus `outputs`, the final
    output of every choice (`SamplingParams.n` of them) by `index`, as vLLM's `.outputs`."""

    outputs: list[RequestOutput] = field(default_factory=list)

    @classmethod
    def of(cls, finals: list[RequestOutput]) -> GenerateResult:
        first = finals[0]
        return cls(**{f.name: getattr(first, f.name) for f in fields(RequestOutput)}, outputs=finals)


class LLM:
    """Synchronous batch generation with a progress bar; one engine for the object's lifetime."""

    def __init__(self, config: EngineConfig | None = None, **overrides: Any) -> None:
        config = config or EngineConfig(**overrides)
        self._stack = ExitStack()
        self._portal: BlockingPortal = self._stack.enter_context(start_blocking_portal("asyncio"))
        try:
            self.engine: Engine = self._portal.call(Engine.start, config)
        except BaseException:
            self._stack.close()
            raise
        self._closed = False

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[GenerateResult]:
        """Generate for every prompt (continuously batched); one result per prompt, in the
        prompts' order, holding every choice's final output (`GenerateResult.outputs`)."""
        prompt_list: list[Any] = [prompts] if isinstance(prompts, str) else list(prompts)
        if params is None or isinstance(params, SamplingParams):
            param_list = [params or SamplingParams()] * len(prompt_list)
        else:
            param_list = list(params)
            if len(param_list) != len(prompt_list):
                raise ValueError(f"{len(param_list)} SamplingParams for {len(prompt_list)} prompts")
        return self._portal.call(self._generate_all, prompt_list, param_list, use_tqdm)

    def chat(
        self,
        conversations: Sequence[list[dict[str, str]]],
        params: SamplingParams | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[GenerateResult]:
        """Reply to each conversation with the model's chat template.

        As `Engine.chat`: the template writes its special tokens and no others are added (text
        prompts to `generate` get the tokenizer's own, e.g. a Llama BOS); a malformed
        conversation raises InvalidRequestError.
        """
        token_lists = [self.engine._chat_token_ids(list(c)) for c in conversations]
        return self.generate(token_lists, params, use_tqdm=use_tqdm)

    async def _generate_all(
        self, prompts: list[Any], params: list[SamplingParams], use_tqdm: bool
    ) -> list[GenerateResult]:
        results: list[GenerateResult | None] = [None] * len(prompts)
        # disable=None: tqdm draws only where stderr is a terminal.
        bar = tqdm(total=len(prompts), desc="generating", unit="req", disable=None if use_tqdm else True)

        async def one(index: int) -> None:
            finals: dict[int, RequestOutput] = {}
            async for out in self.engine.generate(prompts[index], params[index]):
                finals[out.index] = out  # each choice's last output is its finished one
            results[index] = GenerateResult.of([finals[i] for i in sorted(finals)])
            bar.update(1)

        try:
            async with anyio.create_task_group() as tg:
                for index in range(len(prompts)):
                    tg.start_soon(one, index)
        finally:
            bar.close()
        return [r for r in results if r is not None]

    def close(self) -> None:
        """Stop the engine and its workers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._portal.call(self.engine.aclose)
        finally:
            self._stack.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
