"""shardline's engine: embed with `await Engine.start(EngineConfig(...))`, or batch with `LLM`."""

from engine.api import Engine
from engine.config import ConfigError, EngineConfig
from engine.core import EngineStats
from engine.errors import (
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    PromptTooLongError,
    ShardlineError,
)
from engine.llm import LLM
from engine.request import FinishReason, RequestOutput, SamplingParams, TokenLogprob

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
