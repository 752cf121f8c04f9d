"""What the HTTP layer needs from an engine: the part of `engine.Engine` it calls.

Typing the server against this protocol (rather than `Engine`) keeps it honest about its
dependencies and lets tests drive it with an in-process double.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

from shardline.engine.request import RequestOutput, SamplingParams
from shardline.engine.structured_output import StructuredOutputSpec


class EngineLike(Protocol):
    """The `Engine` API surface used by `engine.server` (docs/INTERFACES.md section 4)."""

    @property
    def tokenizer(self) -> Any: ...

    @property
    def model_name(self) -> str: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def max_prompt_chars(self) -> int:
        """Characters past which a text prompt (or a chat's contents) cannot fit the context:
        the server refuses such a text from its length, before tokenizing it."""
        ...

    @property
    def is_dead(self) -> bool: ...

    def generate(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]: ...

    def chat(
        self, messages: list[dict[str, Any]], params: SamplingParams | None = None, request_id: str | None = None,
        *, chat_template_kwargs: Mapping[str, Any] | None = None, tools: list[dict[str, Any]] | None = None,
    ) -> AsyncIterator[RequestOutput]: ...

    async def compile_grammar(self, spec: StructuredOutputSpec) -> Any:
        """Compile a structured-output spec (cached); InvalidRequestError names its field when
        the grammar cannot enforce it."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> Any: ...
