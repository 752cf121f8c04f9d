"""The engine's error vocabulary: what a caller of `Engine` / `LLM` can be handed.

Request problems are `InvalidRequestError` (a `ValueError` naming the offending field), so an
HTTP layer can map them to 400 without knowing the engine; engine problems are `RuntimeError`s.
"""

from __future__ import annotations


class ShardlineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(ShardlineError, ValueError):
    """A request (prompt or sampling parameter) was rejected; `field` names what was wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"invalid {field}: {message}")
        self.field = field
        self.message = message


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus the tokens asked for) does not fit in the model's context length."""

    def __init__(self, message: str) -> None:
        super().__init__("prompt", message)


class EngineDeadError(ShardlineError, RuntimeError):
    """The engine (or one of its workers) died; no request can make progress any more."""


class EngineOverloadedError(ShardlineError, RuntimeError):
    """The waiting queue is full; the caller should retry later."""
