"""A stand-in model that returns instantly: for measuring the engine's own per-step overhead.

`ShardlineStandInForCausalLM` does no math beyond shaping its outputs: the "hidden state" of a
token is its position, and `compute_logits` gathers one row per sampled token from a small
cached one-hot table, so greedy argmax yields a deterministic, varied token that depends only
on the position (`token_at(position)`). Logits cover only the first `logits_width` vocabulary
ids (default 1024): scanning a full 49k vocabulary per row would be model cost, not engine
cost. The ids drawn skip the first `first_token_id` ids (special tokens in SmolLM2's
vocabulary), so detokenization works on ordinary BPE pieces.

It is a benchmark mode only (never used by correctness tests beyond a load check). Register it
in every worker with ``EngineConfig(plugins=("shardline.model.standin:register",))`` and point the engine
at a directory made by `write_standin_model_dir` (config.json naming the architecture, a tiny
safetensors file, and a real tokenizer copied beside them).
"""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

ARCHITECTURE = "ShardlineStandInForCausalLM"
TABLE_PERIOD = 997  # positions per cycle of the token table (prime: no short repeats)
DEFAULT_LOGITS_WIDTH = 1024
DEFAULT_FIRST_TOKEN_ID = 17
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def token_at(position: int, *, width: int = DEFAULT_LOGITS_WIDTH, first: int = DEFAULT_FIRST_TOKEN_ID) -> int:
    """The token the stand-in samples at `position` (greedy)."""
    generator = torch.Generator().manual_seed(0)
    table = torch.randint(first, width, (TABLE_PERIOD,), generator=generator)
    return int(table[position % TABLE_PERIOD])


class StandInForCausalLM(nn.Module):
    """Instant model: hidden = position, logits = a cached one-hot row per position."""

    supports_lazy_weights = True  # nothing is read from the checkpoint

    def __init__(self, model_config: Any, parallel_context: Any = None) -> None:
        super().__init__()
        hf = model_config.hf_config
        vocab_size = int(hf.vocab_size)
        width = min(int(getattr(hf, "standin_logits_width", DEFAULT_LOGITS_WIDTH)), vocab_size)
        first = min(int(getattr(hf, "standin_first_token_id", DEFAULT_FIRST_TOKEN_ID)), width - 1)
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(first, width, (TABLE_PERIOD,), generator=generator)
        table = torch.zeros(TABLE_PERIOD, width, dtype=torch.float32)
        table[torch.arange(TABLE_PERIOD), tokens] = 1.0
        self.table: torch.Tensor
        self.register_buffer("table", table, persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: Any, intermediate: Any = None) -> torch.Tensor:
        """[T, 1]: each token's position (what `compute_logits` needs to pick the next token)."""
        # The next token is sampled for position + 1 (the row after the last scheduled token).
        return (positions + 1).remainder(TABLE_PERIOD).unsqueeze(1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, width] logits: one cached one-hot row per sampling request."""
        return self.table.index_select(0, hidden.squeeze(1))

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """Nothing to load: walk the checkpoint's names without reading any tensor."""
        return {name for name, _ in weights}


def register() -> None:
    """Plugin entry (``"shardline.model.standin:register"``): make the architecture known in this process."""
    from shardline.model.registry import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, "shardline.model.standin:StandInForCausalLM")


def write_standin_model_dir(
    path: str | pathlib.Path,
    tokenizer_dir: str | pathlib.Path,
    *,
    max_position_embeddings: int = 8192,
    logits_width: int = DEFAULT_LOGITS_WIDTH,
) -> pathlib.Path:
    """A loadable stand-in model directory using the tokenizer files of `tokenizer_dir`."""
    from safetensors.torch import save_file

    root = pathlib.Path(path)
    root.mkdir(parents=True, exist_ok=True)
    source = pathlib.Path(tokenizer_dir)
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, root / name)
    source_config = json.loads((source / "config.json").read_text()) if (source / "config.json").is_file() else {}
    config = {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "vocab_size": int(source_config.get("vocab_size", 49152)),
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "max_position_embeddings": max_position_embeddings,
        "bos_token_id": source_config.get("bos_token_id"),
        "eos_token_id": source_config.get("eos_token_id"),
        "standin_logits_width": logits_width,
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    save_file({"standin.marker": torch.zeros(1)}, str(root / "model.safetensors"))
    return root
