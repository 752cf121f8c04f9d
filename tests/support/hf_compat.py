"""Calling transformers across its renames (4.45 .. 5.x) in reference computations."""

from __future__ import annotations

import inspect
from typing import Any


def cache_kwarg(model: Any) -> str:
    """The keyword `model.forward` takes its KV cache under: `cache` (transformers >= 5.2x)
    or `past_key_values` (earlier; later deprecated with a FutureWarning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned, under either name."""
    return out.cache if hasattr(out, "cache") else out.past_key_values
