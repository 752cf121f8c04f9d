"""Llama-family decoders (Llama, Mistral, Qwen2, SmolLM2) built from the parallel layers, and
the pieces the other architectures compose (`qwen3.py`, `phi3.py`, `gemma2.py`, `mixtral.py`...).

One class covers the family; the differences are config values (rope settings, head_dim,
tied embeddings, sliding windows) and, for Qwen2, biases on the q/k/v projections. Another
architecture subclasses `LlamaForCausalLM` and overrides `make_layer` (and, where its checkpoint
names differ, `expand_checkpoint_tensor`). Under pipeline parallelism a stage builds only its
layer range (the others are empty placeholders so checkpoint names keep their indices); a
non-last stage returns `(hidden, residual)` for the next stage.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from shardline.model import cpu_ops, packed_linear, paged_decode
from shardline.model.attention import Attention, AttentionMetadata, step_rowwise_metadata
from shardline.model.config import ModelConfig
from shardline.model.env import env_choice
from shardline.model.errors import CheckpointError
from shardline.model.layers import (
    FULL_ATTENTION,
    RMSNorm,
    RotaryEmbedding,
    SiluAndMul,
    gated_activation,
    layer_types,
    rope_parameters,
    sliding_windows,
    soft_cap,
)
from shardline.model.moe import FusedMoE, expert_param_for
from shardline.model.parallel import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    ShardShapeError,
    VocabParallelEmbedding,
)
from shardline.model.parallel.utils import copy_checked, read
from shardline.model.parallel_context import ParallelContext
from shardline.model.q8_linear import Q8Weight

# (fused parameter, checkpoint name part, shard id)
STACKED_PARAMS = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")
# `off` keeps CPU steps on the Python layers instead of the C++ loop over them (same results).
CPU_DECODER_ENV = "SHARDLINE_CPU_DECODER_LOOP"


def pp_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """`[start, end)` of the decoder layers on pipeline stage `pp_rank` (even split; the
    first `num_layers % pp_size` stages take one extra layer)."""
    if pp_size > num_layers:
        raise ValueError(f"pipeline_parallel_size={pp_size} exceeds the {num_layers} layers")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


def default_weight_loader(param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
    """Replicated parameters (norms): the whole tensor, shape-checked."""
    copy_checked(param.data, read(loaded))


class MissingLayer(nn.Module):
    """Placeholder for a decoder layer that lives on another pipeline stage."""


def head_dim_of(config: Any) -> int:
    """The attention head size: `head_dim` where the config sets it, else hidden / heads."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


class LlamaAttention(nn.Module):
    """qkv -> (optional per-head q/k norm) -> rotary -> paged attention -> o.

    `qk_norm`: a norm class applied to each head of q and k before the rotary (Qwen3, Gemma 3);
    `scale` defaults to head_dim^-0.5; `sliding_window` / `logit_softcap` reach `Attention`."""

    def __init__(self, config: Any, ctx: ParallelContext, qkv_bias: bool, o_bias: bool,
                 dtype: torch.dtype, *, qk_norm: type[RMSNorm] | None = None,
                 scale: float | None = None, sliding_window: int | None = None,
                 logit_softcap: float | None = None) -> None:
        super().__init__()
        hidden_size = config.hidden_size
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = head_dim_of(config)
        self.head_dim = head_dim
        self.qkv_proj = QKVParallelLinear(hidden_size, head_dim, num_heads, num_kv_heads,
                                          qkv_bias, ctx, dtype=dtype)
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden_size, o_bias, ctx, dtype=dtype)
        self.q_size = self.qkv_proj.q_size
        self.kv_size = self.qkv_proj.kv_size
        self.q_norm = qk_norm(head_dim, config.rms_norm_eps, dtype) if qk_norm else None
        self.k_norm = qk_norm(head_dim, config.rms_norm_eps, dtype) if qk_norm else None
        self.attn = Attention(self.qkv_proj.num_heads, head_dim,
                              head_dim**-0.5 if scale is None else scale,
                              self.qkv_proj.num_kv_heads, sliding_window, logit_softcap)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, attn: AttentionMetadata,
                rotary: RotaryEmbedding) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None and self.k_norm is not None:
            tokens = q.shape[0]
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(tokens, self.q_size)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(tokens, self.kv_size)
        q, k = rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, attn))

    @property
    def is_plain(self) -> bool:
        """No q/k norm, window or soft-cap: what the C++ layer loop computes."""
        return (self.q_norm is None and self.attn.sliding_window is None
                and self.attn.logit_softcap is None)


class LlamaMLP(nn.Module):
    """gate_up -> act(gate) * up -> down; `intermediate_size` overrides the config's (a MoE
    model's dense layers and shared experts)."""

    def __init__(self, config: Any, ctx: ParallelContext, dtype: torch.dtype,
                 intermediate_size: int | None = None) -> None:
        super().__init__()
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
        bias = bool(getattr(config, "mlp_bias", False))
        size = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], bias, ctx,
                                                       dtype=dtype)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias, ctx, dtype=dtype)
        self.act_fn = gated_activation(str(act))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: norm -> attention -> add & norm -> MLP (the residual add fused in the
    norm). `self_attn` / `mlp` default to Llama's; other architectures pass their own (a MoE
    block is an `mlp`); `mlp_name` is its checkpoint name (Mixtral's `block_sparse_moe`)."""

    def __init__(self, config: Any, ctx: ParallelContext, qkv_bias: bool, o_bias: bool,
                 dtype: torch.dtype, *, self_attn: nn.Module | None = None,
                 mlp: nn.Module | None = None, mlp_name: str = "mlp") -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype)
        self.self_attn = self_attn or LlamaAttention(config, ctx, qkv_bias, o_bias, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype)
        self.mlp_name = mlp_name
        self.add_module(mlp_name, mlp or LlamaMLP(config, ctx, dtype))

    @property
    def mlp_module(self) -> nn.Module:
        return getattr(self, self.mlp_name)  # type: ignore[no-any-return]

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None, attn: AttentionMetadata,
                rotary: RotaryEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, attn, rotary)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp_module(hidden), residual

    @property
    def is_plain(self) -> bool:
        """A Llama layer as the C++ layer loop computes it."""
        mlp = self.mlp_module
        return (type(self) is LlamaDecoderLayer and isinstance(mlp, LlamaMLP)
                and isinstance(mlp.act_fn, SiluAndMul) and bool(self.self_attn.is_plain))


LayerFactory = Callable[[int], nn.Module]  # layer index -> decoder layer


class LlamaModel(nn.Module):
    """Embedding, this stage's decoder layers and the final norm.

    `make_layer(i)` builds layer i (default: Llama's); `norm_cls` is the final norm's class;
    `embed_scale` multiplies the embeddings (Gemma's sqrt(hidden)). Each layer kind
    (full / sliding) gets the rotary table of its own rope settings."""

    def __init__(self, config: Any, ctx: ParallelContext, max_model_len: int, qkv_bias: bool,
                 o_bias: bool, dtype: torch.dtype, make_layer: LayerFactory | None = None,
                 norm_cls: type[RMSNorm] = RMSNorm, embed_scale: float | None = None) -> None:
        super().__init__()
        self.ctx = ctx
        self.start_layer, self.end_layer = pp_layer_range(config.num_hidden_layers, ctx.pp_rank,
                                                          ctx.pp_size)
        if ctx.is_first_pp_rank:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx,
                                                       dtype=dtype)
        self.embed_scale = embed_scale
        build = make_layer or (lambda i: LlamaDecoderLayer(config, ctx, qkv_bias, o_bias, dtype))
        self.layers = nn.ModuleList(
            build(i) if self.start_layer <= i < self.end_layer else MissingLayer()
            for i in range(config.num_hidden_layers)
        )
        if ctx.is_last_pp_rank:
            self.norm = norm_cls(config.hidden_size, config.rms_norm_eps, dtype)
        head_dim = head_dim_of(config)
        self.layer_types = layer_types(config)
        self.rotary_emb = RotaryEmbedding(head_dim, max_model_len, rope_parameters(config), dtype)
        self.rotary_by_type = nn.ModuleDict({FULL_ATTENTION: self.rotary_emb})
        for kind in set(self.layer_types) - {FULL_ATTENTION}:
            params = rope_parameters(config, kind)
            self.rotary_by_type[kind] = (self.rotary_emb if params == rope_parameters(config)
                                         else RotaryEmbedding(head_dim, max_model_len, params, dtype))
        self._stack: tuple[Any, ...] | None = None  # the C++ loop's weight lists, once built

    def _cpu_stack(self) -> tuple[Any, ...] | None:
        """The weight and cache lists of `shardline::decoder_layers`, or None when a layer is
        not ready for it (unpacked weights, no KV cache). Rebuilt when either changes."""
        first: Any = self.layers[self.start_layer].self_attn
        if (self._stack is not None and self._stack[0] is first.qkv_proj.packed_weight
                and self._stack[1] is first.attn.kv_cache):
            return self._stack[2:]
        layers: list[Any] = [self.layers[i] for i in range(self.start_layer, self.end_layer)]
        if self.embed_scale is not None or not all(getattr(layer, "is_plain", False) for layer in layers):
            return None
        norms, packed, biases, caches = [], [], [], []
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if any(not isinstance(m.packed_weight, (torch.Tensor, Q8Weight)) for m in linears) \
                    or attn.attn.kv_cache.numel() == 0:
                return None
            norms += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            packed += [m.packed_weight.packed if isinstance(m.packed_weight, Q8Weight) else m.packed_weight
                       for m in linears]
            biases += [m.bias for m in linears]
            caches.append(attn.attn.kv_cache)
        norms.append(self.norm.weight)
        inner = first.attn
        self._stack = (first.qkv_proj.packed_weight, inner.kv_cache, norms, packed, biases, caches,
                       inner.num_heads, inner.num_kv_heads, inner.head_dim, inner.scale,
                       layers[0].input_layernorm.eps)
        return self._stack[2:]

    def _cpu_decoder(self, hidden: torch.Tensor, positions: torch.Tensor,
                     attn: AttentionMetadata) -> torch.Tensor | None:
        """The whole stack in one C++ call (`csrc/cpu_decoder.cpp`: the kernels the layers
        would run, minus ~6 ms of Python per step) when this is a single-rank CPU float32 step
        of decode-sized rows that the fused ops, the packed GEMM and the paged kernel all take;
        None otherwise."""
        tokens = hidden.shape[0]
        mode = env_choice(CPU_DECODER_ENV, ("auto", "off"))
        if (mode == "off" or self.ctx.tp_size != 1 or self.ctx.pp_size != 1 or not 1 <= tokens <= packed_linear.MAX_ROWS
                or positions.dtype != torch.int64 or not cpu_ops.enabled(hidden)):
            return None
        stack = self._cpu_stack()
        if stack is None:
            return None
        norms, packed, biases, caches, heads, kv_heads, head_dim, scale, eps = stack
        if not paged_decode.kernel_enabled(caches[0].device, caches[0].dtype):
            return None
        if attn.max_query_len == 1 and tokens == attn.num_seqs:
            meta = (attn.block_tables, attn.seq_lens, attn.query_start_loc)
        else:
            rowwise = step_rowwise_metadata(attn)
            if rowwise is None or rowwise[1].shape[0] != tokens:  # a chunk too long for it
                return None
            meta = rowwise[:3]
        return torch.ops.shardline.decoder_layers(
            hidden, positions, norms, packed, biases, caches, self.rotary_emb.cos_cache,
            self.rotary_emb.sin_cache, attn.slot_mapping, *meta, heads, kv_heads, head_dim, eps,
            scale)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                intermediate_tensors: tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
        residual: torch.Tensor | None
        if self.ctx.is_first_pp_rank:
            hidden, residual = self.embed_tokens(input_ids), None
            if self.embed_scale is not None:
                # as transformers: the scale rounded to the weights' dtype first
                hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
            fast = self._cpu_decoder(hidden, positions, attn)
            if fast is not None:
                return fast
        else:
            if intermediate_tensors is None:
                raise ValueError("a non-first pipeline stage needs intermediate_tensors")
            hidden, residual = intermediate_tensors
        for i in range(self.start_layer, self.end_layer):
            rotary = self.rotary_by_type[self.layer_types[i]]
            hidden, residual = self.layers[i](positions, hidden, residual, attn, rotary)
        if not self.ctx.is_last_pp_rank:
            return hidden, residual
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Llama / SmolLM2 (and, via subclasses, Mistral and Qwen2) causal LM, TP/PP aware."""

    supports_lazy_weights = True  # load_weights accepts lazy checkpoint slices
    supports_skip_weights = True  # load_weights leaves meta parameters alone (loader.load_model)
    qkv_bias_default = False
    norm_cls: type[RMSNorm] = RMSNorm
    qk_norm: type[RMSNorm] | None = None  # per-head q/k norm before the rotary (Qwen3)

    def __init__(self, model_config: ModelConfig, parallel_context: ParallelContext) -> None:
        super().__init__()
        config = model_config.hf_config
        self.config = config
        self.ctx = parallel_context
        attention_bias = bool(getattr(config, "attention_bias", False))
        self.qkv_bias = self.qkv_bias_default or attention_bias
        self.o_bias = attention_bias
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.final_logit_softcap = getattr(config, "final_logit_softcapping", None)
        dtype = model_config.dtype
        self.windows = sliding_windows(config)
        self.model = LlamaModel(config, parallel_context, model_config.max_model_len, self.qkv_bias,
                                attention_bias, dtype,
                                make_layer=lambda i: self.make_layer(i, dtype),
                                norm_cls=self.norm_cls, embed_scale=self.embed_scale())
        if parallel_context.is_last_pp_rank:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, parallel_context,
                                          dtype=dtype)
            if self.tie_word_embeddings and parallel_context.is_first_pp_rank:
                self.lm_head.weight = self.model.embed_tokens.weight

    def make_layer(self, layer_index: int, dtype: torch.dtype) -> nn.Module:
        """Decoder layer `layer_index` (Llama's, with that layer's sliding window if any)."""
        return self.llama_layer(layer_index, dtype)

    def llama_layer(self, layer_index: int, dtype: torch.dtype, mlp: nn.Module | None = None,
                    mlp_name: str = "mlp") -> LlamaDecoderLayer:
        """Llama's layer with layer `layer_index`'s attention (`make_attention`) and `mlp`
        (default Llama's MLP) under the checkpoint name `mlp_name`."""
        attention = self.make_attention(layer_index, dtype)
        return LlamaDecoderLayer(self.config, self.ctx, self.qkv_bias, self.o_bias, dtype,
                                 self_attn=attention, mlp=mlp, mlp_name=mlp_name)

    def make_attention(self, layer_index: int, dtype: torch.dtype,
                       **options: Any) -> LlamaAttention:
        """Layer `layer_index`'s attention with its window; `options` go to LlamaAttention."""
        return LlamaAttention(self.config, self.ctx, self.qkv_bias, self.o_bias, dtype,
                              qk_norm=self.qk_norm, sliding_window=self.windows[layer_index],
                              **options)

    def embed_scale(self) -> float | None:
        """What the token embeddings are multiplied by (None: nothing)."""
        return None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                intermediate_tensors: tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
        """Hidden states `[T, H]` (last stage) or `(hidden, residual)` (other stages)."""
        return self.model(input_ids, positions, attn, intermediate_tensors)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits `[N, vocab]`, the same on every TP rank."""
        if not self.ctx.is_last_pp_rank:
            raise RuntimeError("compute_logits runs on the last pipeline stage only")
        return soft_cap(self.lm_head(hidden), self.final_logit_softcap)

    def expand_checkpoint_tensor(self, name: str, tensor: Any) -> Iterator[tuple[str, Any]]:
        """The (name, tensor) pairs a checkpoint tensor stands for in Llama's naming (a
        checkpoint that fuses projections splits them here, see phi3.py)."""
        yield name, tensor

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Load Hugging Face-named tensors; each parameter takes this rank's shard.

        Raises CheckpointError naming the tensor when one has the wrong shape, is not expected,
        or (at the end) when a tensor this rank needs never came.
        """
        params = dict(self.named_parameters())
        needed = self._needed_tensors(params)
        for name, tensor in (pair for w in weights for pair in self.expand_checkpoint_tensor(*w)):
            if "rotary_emb." in name:
                continue
            if name == "model.embed_tokens.weight" and "lm_head.weight" in params \
                    and self.tie_word_embeddings and "model.embed_tokens.weight" not in params:
                name = "lm_head.weight"  # tied head on a last stage without the embedding
            elif name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            match = _LAYER_INDEX.match(name)
            if match and not self.model.start_layer <= int(match.group(1)) < self.model.end_layer:
                continue  # another pipeline stage's layer
            if name.startswith(("model.embed_tokens.", "model.norm.", "lm_head.")) \
                    and not self._stage_has(name):
                continue
            param_name, shard_id = self._param_for(name)
            param = params.get(param_name)
            if param is None:
                raise CheckpointError(f"unexpected tensor {name!r} in checkpoint "
                                      f"(no parameter {param_name!r} in {type(self).__name__})")
            if param.is_meta:  # skipped: its packed copy comes from the cache (model/packed_cache.py)
                needed.pop((param_name, shard_id), None)
                continue
            try:
                loader = getattr(param, "weight_loader", default_weight_loader)
                loader(param, tensor, shard_id)
            except ShardShapeError as exc:
                raise CheckpointError(f"tensor {name!r} has the wrong shape: {exc}") from exc
            needed.pop((param_name, shard_id), None)
        if needed:
            missing = sorted(needed.values())
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointError(
                f"checkpoint is missing tensor(s): {', '.join(repr(m) for m in missing[:5])}{more}"
            )

    def _stage_has(self, name: str) -> bool:
        if name.startswith("model.embed_tokens."):
            return self.ctx.is_first_pp_rank
        return self.ctx.is_last_pp_rank

    @staticmethod
    def _param_for(name: str) -> tuple[str, Any]:
        expert = expert_param_for(name)
        if expert is not None:
            return expert
        for param_part, ckpt_part, shard_id in STACKED_PARAMS:
            if f".{ckpt_part}." in name:
                return name.replace(ckpt_part, param_part), shard_id
        return name, None

    def _needed_tensors(self, params: dict[str, nn.Parameter]) -> dict[tuple[str, Any], str]:
        """{(parameter, shard id): checkpoint tensor name} for every tensor this rank must load."""
        needed: dict[tuple[str, Any], str] = {}
        experts: dict[str, dict[tuple[int, int], str]] = {f"{name}.{param}": shards for name, module in self.named_modules()
                   if isinstance(module, FusedMoE)
                   for param, shards in module.checkpoint_shards(name).items()}
        for param_name in params:
            fused = [s for s in STACKED_PARAMS if f".{s[0]}." in param_name]
            if param_name in experts:
                for shard_id, ckpt_name in experts[param_name].items():
                    needed[(param_name, shard_id)] = ckpt_name
            elif fused:
                for param_part, ckpt_part, stacked_id in fused:
                    needed[(param_name, stacked_id)] = param_name.replace(param_part, ckpt_part)
            elif param_name == "lm_head.weight" and self.tie_word_embeddings:
                needed[(param_name, None)] = "model.embed_tokens.weight"
            else:
                needed[(param_name, None)] = param_name
        return needed


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: the Llama layout (with `sliding_window`, every layer attends over that window)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: the Llama layout with biases on the q, k and v projections."""

    qkv_bias_default = True
