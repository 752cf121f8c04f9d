"""What the engine side needs to know about a model: path, tokenizer, limits, chat template."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Any

from shardline.engine.config import ConfigError, EngineConfig


@dataclass(frozen=True)
class ModelInfo:
    """The engine-side view of a model; the weights themselves live in the workers."""

    name: str
    path: pathlib.Path
    tokenizer: Any
    max_model_len: int
    vocab_size: int
    eos_token_id: int | None
    hf_config: Any

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of `messages` formatted by the model's chat template, ready for a reply."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return [int(t) for t in ids]


def load_model_info(config: EngineConfig) -> ModelInfo:
    """Resolve (fetching the default model on first use) and describe `config.model` (blocking)."""
    from transformers import AutoTokenizer

    from shardline.model.config import ModelConfig
    from shardline.model.fetch import resolve_model_path

    path = resolve_model_path(config.model)
    model_config = ModelConfig.from_path(
        str(path), architecture=config.model_arch, max_model_len=config.max_model_len
    )
    hf = model_config.hf_config
    check_parallel_sizes(config, hf)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    eos = getattr(hf, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is None:
        eos = tokenizer.eos_token_id
    name = config.model if not pathlib.Path(config.model).exists() else path.name
    return ModelInfo(
        name=name,
        path=path,
        tokenizer=tokenizer,
        max_model_len=model_config.max_model_len,
        vocab_size=int(hf.vocab_size),
        eos_token_id=eos,
        hf_config=hf,
    )


def check_parallel_sizes(config: EngineConfig, hf_config: Any) -> None:
    """Refuse sharding the model cannot take, naming the numbers."""
    tp = config.tensor_parallel_size
    heads = int(hf_config.num_attention_heads)
    if heads % tp:
        raise ConfigError(
            "tensor_parallel_size",
            f"{tp} does not divide the model's {heads} attention heads",
        )
    kv_heads = int(getattr(hf_config, "num_key_value_heads", heads) or heads)
    if kv_heads % tp and tp % kv_heads:
        raise ConfigError(
            "tensor_parallel_size",
            f"{tp} neither divides nor is a multiple of the model's {kv_heads} KV heads",
        )
    layers = int(hf_config.num_hidden_layers)
    if config.pipeline_parallel_size > layers:
        raise ConfigError(
            "pipeline_parallel_size",
            f"{config.pipeline_parallel_size} stages for a model of {layers} layers",
        )
