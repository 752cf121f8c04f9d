"""transformers' model for a shardline model path: a checkpoint directory, a `.gguf` file, or a
directory holding one GGUF and its tokenizer but no config.json (the default model's cache),
which transformers loads from the GGUF (dequantized to float32: the values shardline computes with)."""

from __future__ import annotations

import os
from typing import Any


def hf_causal_lm(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """`AutoModelForCausalLM.from_pretrained` for `path` (float32 unless `dtype` says), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from shardline.model.gguf_reader import transformers_source

    folder, extra = transformers_source(path)
    kwargs.setdefault("dtype", torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, **extra, **kwargs).eval()
