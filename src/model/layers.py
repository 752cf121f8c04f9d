"""Small building blocks of the decoders: RMSNorm (and Gemma's), rotary embeddings (default,
linear, llama3, yarn, dynamic NTK, longrope), the gated activations (SwiGLU, GeGLU), soft-capping
and the per-layer attention kinds (full or sliding window) of a config."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardline.model import cpu_ops
from shardline.model.config import (  # re-exported: the rope and layer-kind settings
    FULL_ATTENTION,
    SLIDING_ATTENTION,
    SUPPORTED_ROPE_TYPES,
    check_rope_parameters,
    layer_types,
    rope_parameters,
    sliding_windows,
)

__all__ = [
    "FULL_ATTENTION",
    "SLIDING_ATTENTION",
    "SUPPORTED_ROPE_TYPES",
    "GemmaRMSNorm",
    "GeluAndMul",
    "RMSNorm",
    "RotaryEmbedding",
    "SiluAndMul",
    "check_rope_parameters",
    "gated_activation",
    "layer_types",
    "rope_frequencies",
    "rope_inv_freq",
    "rope_parameters",
    "sliding_windows",
    "soft_cap",
]


class RMSNorm(nn.Module):
    """Root-mean-square norm, optionally fused with the residual add that precedes it.

    `forward(x)` -> normed x; `forward(x, residual)` -> (normed x + residual, x + residual).
    """

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        """With a residual, `x` and `residual` may be updated in place (CPU fused op)."""
        if x.dim() == 2 and cpu_ops.enabled(x):
            if residual is None:
                return cpu_ops.rms_norm(x, self.weight, self.eps)
            cpu_ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
            return x, residual
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the checkpoint stores `w` and the norm scales by `1 + w`.

    The loader adds the 1 once, so the forward (and the fused CPU op) is plain RMSNorm; in
    float32 `x * (1 + w)` rounds the same either way."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__(hidden_size, eps, dtype)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    @staticmethod
    def weight_loader(param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        from shardline.model.parallel.utils import copy_checked, read

        copy_checked(param.data, read(loaded).float().add(1.0).to(param.dtype))


class SiluAndMul(nn.Module):
    """SwiGLU's gate: `silu(x[:, :d]) * x[:, d:]` for the merged gate/up projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and cpu_ops.enabled(x):
            return cpu_ops.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluAndMul(nn.Module):
    """GeGLU's gate: `gelu(x[:, :d]) * x[:, d:]` (`approximate="tanh"` for gelu_pytorch_tanh)."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate) * up


# config `hidden_act` / `hidden_activation` -> the gated activation over [gate | up]
GATED_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "silu": SiluAndMul,
    "swish": SiluAndMul,
    "gelu": lambda: GeluAndMul("none"),
    "gelu_pytorch_tanh": lambda: GeluAndMul("tanh"),
    "gelu_new": lambda: GeluAndMul("tanh"),
}


def gated_activation(name: str) -> nn.Module:
    """The `act(gate) * up` module for activation `name`; ValueError naming it otherwise."""
    try:
        return GATED_ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"hidden_act={name!r} is not supported; supported: "
                         f"{', '.join(sorted(GATED_ACTIVATIONS))}") from None


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """`cap * tanh(x / cap)` (Gemma 2's logit soft-capping); `x` itself when cap is None."""
    if not cap:
        return x
    return torch.tanh(x / cap) * cap


def _default_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(head_dim: int, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """transformers' `_compute_yarn_parameters`: (inv_freq, attention factor)."""
    base = float(params["rope_theta"])
    original = int(params["original_max_position_embeddings"])
    factor = float(params["factor"])
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else _yarn_mscale(factor))
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no singular ramp
    pos_freqs = base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rope_frequencies(head_dim: int, params: dict[str, Any],
                     max_position: int) -> tuple[torch.Tensor, torch.Tensor | None, int, float]:
    """(inverse frequencies, those of positions from `boundary` on or None, boundary,
    attention factor on cos/sin), following transformers' rope initialisers.

    `freq_factors` (llama.cpp's `rope_freqs.weight`, as a GGUF file holds Llama 3.1's llama3
    scaling) divide the frequencies of default, linear or yarn rope, as llama.cpp applies them.

    `longrope` (Phi-3) and `dynamic` change frequencies past the pretraining length; transformers
    switches every position of a sequence once it is longer, which a KV cache cannot follow, so
    here (as in vLLM) a position's own index picks them: below `original_max_position_embeddings`
    the short/default ones (where transformers agrees), from it on the long/scaled ones."""
    check_rope_parameters(params)
    rope_type = params["rope_type"]
    base = float(params["rope_theta"])
    inv_freq = _default_inv_freq(head_dim, base)
    factors = params.get("freq_factors")
    if factors is not None:  # a GGUF file's rope_freqs.weight: each frequency over its factor
        if len(factors) != head_dim // 2:
            raise ValueError(f"rope freq_factors has {len(factors)} values; head_dim {head_dim} "
                             f"needs {head_dim // 2}")
        plain = dict(params)
        del plain["freq_factors"]
        inv_freq, long_inv_freq, boundary, attention_factor = rope_frequencies(head_dim, plain,
                                                                               max_position)
        return (inv_freq / torch.tensor(factors, dtype=torch.float32), long_inv_freq, boundary,
                attention_factor)
    if rope_type == "default":
        return inv_freq, None, max_position, 1.0
    if rope_type == "linear":
        return inv_freq / float(params["factor"]), None, max_position, 1.0
    if rope_type == "llama3":
        factor = float(params["factor"])
        low_freq_factor = float(params["low_freq_factor"])
        high_freq_factor = float(params["high_freq_factor"])
        old_context_len = params.get("original_max_position_embeddings") or max_position
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled), None, max_position, 1.0
    if rope_type == "yarn":
        yarn_freq, attention_factor = _yarn(head_dim, params)
        return yarn_freq, None, max_position, attention_factor
    original = int(params["original_max_position_embeddings"])
    if rope_type == "dynamic":
        factor = float(params["factor"])
        length = max(max_position, original)
        scaled_base = base * ((factor * length / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return inv_freq, _default_inv_freq(head_dim, scaled_base), original, 1.0
    # longrope
    long_factor = float(params.get("factor") or (params.get("max_position_embeddings") or original) / original)
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if long_factor <= 1.0 else math.sqrt(1 + math.log(long_factor) / math.log(original))
    shape = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    short = 1.0 / (torch.tensor(params["short_factor"], dtype=torch.float32) * base**shape)
    long = 1.0 / (torch.tensor(params["long_factor"], dtype=torch.float32) * base**shape)
    return short, long, original, float(attention)


def rope_inv_freq(head_dim: int, params: dict[str, Any], max_position: int) -> torch.Tensor:
    """Inverse frequencies of the first positions (below any switch to long-context ones)."""
    return rope_frequencies(head_dim, params, max_position)[0]


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate halves) with a precomputed cos/sin table."""

    def __init__(self, head_dim: int, max_position: int, params: dict[str, Any],
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq, long_inv_freq, boundary, attention_factor = rope_frequencies(head_dim, params,
                                                                               max_position)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        if long_inv_freq is not None and boundary < max_position:
            freqs[boundary:] = torch.outer(torch.arange(boundary, max_position, dtype=torch.float32),
                                           long_inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos_cache: torch.Tensor
        self.sin_cache: torch.Tensor
        self.register_buffer("cos_cache", (emb.cos() * attention_factor).to(dtype), persistent=False)
        self.register_buffer("sin_cache", (emb.sin() * attention_factor).to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q `[T, heads * D]` and k `[T, kv_heads * D]` by their token positions
        (in place on CPU float32, where the fused op runs)."""
        if q.dim() == 2 and cpu_ops.enabled(q) and positions.dtype == torch.int64:
            cpu_ops.rotary_embedding(positions, q, k, self.cos_cache, self.sin_cache)
            return q, k
        cos = self.cos_cache[positions].unsqueeze(1)
        sin = self.sin_cache[positions].unsqueeze(1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.view(shape[0], -1, self.head_dim)
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return (x * cos + rotated * sin).view(shape)
