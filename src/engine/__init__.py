"""shardline's engine: embed with `await Engine.start(EngineConfig(...))`, or batch with `LLM`."""

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
from shardline.engine.llm import LLM
from shardline.engine.request import FinishReason, RequestOutput, SamplingParams, TokenLogprob

__all__ = [
    "LLM",
    "ConfigError",
    "Engine",
    "EngineConfig",
    "EngineDeadError",
    "EngineOverloadedError",
    "EngineStats",
    "FinishReason",
    "InvalidRequestError",
    "PromptTooLongError",
    "RequestOutput",
    "SamplingParams",
    "ShardlineError",
    "TokenLogprob",
]
