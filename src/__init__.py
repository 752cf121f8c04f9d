"""shardline: an asyncio, actor-style LLM inference engine you embed in your Python service.

    from shardline import Engine, EngineConfig, SamplingParams

The layers are `shardline.engine` (the caller's process), `shardline.transport` (typed messages),
`shardline.worker` (one process per rank: `python -m shardline.worker`) and `shardline.model`
(what runs inside a worker). Names are imported on first use, so a worker process that imports
`shardline.worker` never pays for the engine's imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "shardline.engine.llm",
    "ConfigError": "shardline.engine.config",
    "Engine": "shardline.engine.api",
    "EngineConfig": "shardline.engine.config",
    "EngineDeadError": "shardline.engine.errors",
    "EngineOverloadedError": "shardline.engine.errors",
    "EngineStats": "shardline.engine.core",
    "FinishReason": "shardline.engine.request",
    "InvalidRequestError": "shardline.engine.errors",
    "PromptTooLongError": "shardline.engine.errors",
    "RequestOutput": "shardline.engine.request",
    "SamplingParams": "shardline.engine.request",
    "ShardlineError": "shardline.engine.errors",
    "TokenLogprob": "shardline.engine.request",
    "WorkerFailure": "shardline.engine.executor",
    "ModelRegistry": "shardline.model.registry",
    "ParallelContext": "shardline.model.parallel_context",
}

__all__ = [
    "ConfigError",
    "Engine",
    "EngineConfig",
    "EngineDeadError",
    "EngineOverloadedError",
    "EngineStats",
    "FinishReason",
    "InvalidRequestError",
    "LLM",
    "ModelRegistry",
    "ParallelContext",
    "PromptTooLongError",
    "RequestOutput",
    "SamplingParams",
    "ShardlineError",
    "TokenLogprob",
    "WorkerFailure",
]

if TYPE_CHECKING:
    from shardline.engine.api import Engine
    from shardline.engine.config import ConfigError, EngineConfig
    from shardline.engine.core import EngineStats
    from shardline.engine.errors import (
        EngineDeadError,
        EngineOverloadedError,
        InvalidRequestError,
        PromptTooLongError,
        ShardlineError,
    )
    from shardline.engine.executor import WorkerFailure
    from shardline.engine.llm import LLM
    from shardline.engine.request import FinishReason, RequestOutput, SamplingParams, TokenLogprob
    from shardline.model.parallel_context import ParallelContext
    from shardline.model.registry import ModelRegistry


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'shardline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
