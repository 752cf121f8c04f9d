"""What a worker needs to know about a checkpoint before building the model."""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

# GGUF files name a model family, not a transformers class.
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    # issue 24 (the families transformers also loads from GGUF, its reference)
    "qwen3": "Qwen3ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
# dtype names -> torch attribute names (torch is imported only when a dtype is asked for: the
# engine's process reads model configs too, and never needs torch)
_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def _dtype_name(dtype: torch.dtype | str | None) -> str:
    """The canonical name of a dtype or dtype name; None means float32 (the CPU default)."""
    if dtype is None or dtype == "auto":
        return "float32"
    text = str(dtype).lower().removeprefix("torch.")
    if not isinstance(dtype, str):  # a torch.dtype: any of them, as it is
        return text
    try:
        return _DTYPES[text]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(_DTYPES))}") from None


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """torch dtype from a dtype or its name; None means float32 (the CPU default)."""
    import torch

    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, _dtype_name(dtype))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class ModelConfig:
    """A local checkpoint (Hugging Face directory or GGUF file) and how to run it."""

    path: str
    hf_config: Any
    architecture: str
    dtype_name: str
    max_model_len: int
    gguf_file: str | None = None  # set when the weights come from a GGUF file

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype_name)  # type: ignore[no-any-return]

    @classmethod
    def from_path(
        cls,
        path: str | pathlib.Path,
        *,
        dtype: torch.dtype | str | None = None,
        architecture: str | None = None,
        max_model_len: int | None = None,
    ) -> ModelConfig:
        """Read `config.json` (or a GGUF file's metadata) at `path`."""
        root = pathlib.Path(path).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"model path {str(root)!r} does not exist")
        gguf_file: pathlib.Path | None = None
        if root.is_file():
            if root.suffix != ".gguf":
                raise ValueError(f"{str(root)!r} is a file but not a .gguf; pass a model directory")
            gguf_file = root
        elif not (root / "config.json").is_file():
            ggufs = sorted(root.glob("*.gguf"))
            if len(ggufs) != 1:
                raise FileNotFoundError(
                    f"{str(root)!r} has no config.json"
                    + (f" and {len(ggufs)} .gguf files (expected one)" if ggufs else " and no .gguf file")
                )
            gguf_file = ggufs[0]
        hf_config = _read_gguf_config(gguf_file) if gguf_file else _read_hf_config(root)
        arch = architecture or _architecture_of(hf_config)
        # Sliding-window layers attend over their window (model/attention.py): the model's
        # whole length is usable.
        limit = getattr(hf_config, "max_position_embeddings", None) or 2048
        check_supported_config(hf_config)
        if max_model_len is None:
            max_model_len = int(limit)
        elif max_model_len < 1 or max_model_len > limit:
            raise ValueError(
                f"max_model_len={max_model_len} must be between 1 and the model's limit {limit}"
            )
        return cls(
            path=str(root),
            hf_config=hf_config,
            architecture=arch,
            dtype_name=_dtype_name(dtype),
            max_model_len=max_model_len,
            gguf_file=str(gguf_file) if gguf_file else None,
        )


class HFConfig(SimpleNamespace):
    """`config.json` as attributes, with the Llama-family defaults transformers would fill in.

    Read without importing transformers (whose config classes cost seconds of import time in
    every worker process); `to_dict()` and `get()` cover what callers use of PretrainedConfig.
    """

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "architectures": None,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "head_dim": None,
        "sliding_window": None,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }

    def __init__(self, **values: Any) -> None:
        merged = dict(self.DEFAULTS)
        merged.update(values)
        if merged.get("num_key_value_heads") is None and "num_attention_heads" in merged:
            merged["num_key_value_heads"] = merged["num_attention_heads"]
        super().__init__(**merged)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


def _read_hf_config(root: pathlib.Path) -> HFConfig:
    try:
        values = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {str(root / 'config.json')!r}: {exc}") from exc
    if not isinstance(values, dict):
        raise ValueError(f"{str(root / 'config.json')!r} is not a JSON object")
    return HFConfig(**values)


# GGUF metadata key (after the "<arch>." prefix) -> config attribute
_GGUF_KEYS = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "rope.freq_base": "rope_theta",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
    "attention.key_length": "head_dim",
    "expert_count": "num_experts",
    "expert_used_count": "num_experts_per_tok",
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
    "attention.sliding_window": "sliding_window",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
}
# What a GGUF file does not say about its family, as llama.cpp runs it: Qwen3-MoE renormalises
# the top-k routing weights (every Qwen3-MoE checkpoint sets norm_topk_prob), Qwen2-MoE does not.
_GGUF_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3moe": {"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []},
    "qwen2moe": {"norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": []},
    # Gemma 2: GeGLU and llama.cpp's soft-capping defaults (query scale: see _read_gguf_config)
    "gemma2": {"hidden_activation": "gelu_pytorch_tanh", "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0},
    # Gemma 3 (text): GeGLU, every 6th layer global, local layers' rope base 10000
    "gemma3": {"hidden_activation": "gelu_pytorch_tanh", "sliding_window_pattern": 6,
               "rope_local_base_freq": 10000.0},
}


# The rope metadata a GGUF file may carry (after "<arch>.rope."), read as llama.cpp reads it;
# any other rope key is refused by name, never run as plain rope.
_GGUF_ROPE_KEYS = frozenset({
    "freq_base", "freq_base_swa", "dimension_count", "scaling.type", "scaling.factor",
    "scale_linear", "scaling.original_context_length", "scaling.finetuned", "scaling.attn_factor",
    "scaling.yarn_ext_factor", "scaling.yarn_attn_factor", "scaling.yarn_beta_fast",
    "scaling.yarn_beta_slow", "scaling.yarn_log_multiplier",
})
_GGUF_ROPE_TYPES = ("none", "linear", "yarn", "longrope")
_GGUF_ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def _gguf_rope_scaling(where: str, arch: str, fields: dict[str, Any],
                       vectors: dict[str, list[float]], rotary_dim: int | None) -> dict[str, Any] | None:
    """The `rope_scaling` of a GGUF file's rope metadata and tensors (None: plain rope), as
    llama.cpp runs them: `rope_freqs.weight` (Llama 3.1+: the llama3 scaling as per-dimension
    factors, each inverse frequency divided by its factor) becomes `freq_factors`;
    `rope.scaling.type` linear / yarn (absent with a factor: linear, llama.cpp's default) with
    `rope.scaling.factor`, the original context length and yarn's beta / attention fields map to
    transformers' linear / yarn; Phi-3's `rope_factors_long/short.weight` (+ the original context
    length and `rope.scaling.attn_factor`) to longrope. CheckpointError naming the key or tensor
    for anything else."""
    from shardline.model.errors import CheckpointError

    prefix = f"{arch}.rope."
    unknown = sorted(k for k in fields if k.startswith(prefix) and k[len(prefix):] not in _GGUF_ROPE_KEYS)
    if unknown:
        raise CheckpointError(f"{where} sets {unknown[0]}={fields[unknown[0]]!r}: shardline does not read "
                              "that rope setting from GGUF files")

    def get(key: str) -> Any:
        return fields.get(prefix + key)

    for name, values in vectors.items():
        if rotary_dim is not None and len(values) != rotary_dim // 2:
            raise CheckpointError(f"{where} holds {name} with {len(values)} values; the rotary "
                                  f"dimensions ({rotary_dim}) need {rotary_dim // 2}")
        if not all(v > 0 for v in values):  # also refuses NaN
            raise CheckpointError(f"{where} holds {name} with a value that is not positive")
    kind = get("scaling.type")
    if kind is not None and kind not in _GGUF_ROPE_TYPES:
        raise CheckpointError(f"{where} sets {prefix}scaling.type={kind!r}; shardline reads "
                              f"{', '.join(_GGUF_ROPE_TYPES)}")
    factor = get("scaling.factor") if get("scaling.factor") is not None else get("scale_linear")
    factor = float(factor) if factor else None  # llama.cpp: 0 (or no key) means no factor
    original = get("scaling.original_context_length") or fields.get(f"{arch}.context_length")
    attn_factor = get("scaling.attn_factor")
    out: dict[str, Any]
    if "rope_factors_long.weight" in vectors or "rope_factors_short.weight" in vectors:
        missing = {"rope_factors_long.weight", "rope_factors_short.weight"} - set(vectors)
        if missing:
            raise CheckpointError(f"{where} holds one of Phi-3's rope factor tensors but not {missing.pop()}")
        if arch != "phi3" or kind not in (None, "longrope") or factor or "rope_freqs.weight" in vectors:
            raise CheckpointError(
                f"{where} holds rope_factors_long.weight and rope_factors_short.weight with "
                f"architecture {arch!r}, {prefix}scaling.type={kind!r}, factor={factor!r}: shardline "
                "reads them as Phi-3's longrope only (architecture phi3, no other rope scaling)")
        out = {"rope_type": "longrope", "long_factor": vectors["rope_factors_long.weight"],
               "short_factor": vectors["rope_factors_short.weight"],
               "original_max_position_embeddings": original}
        if attn_factor is not None:
            out["attention_factor"] = float(attn_factor)
        return out
    if attn_factor is not None and float(attn_factor) != 1.0:
        raise CheckpointError(f"{where} sets {prefix}scaling.attn_factor={attn_factor!r}: shardline "
                              "reads it for Phi-3's longrope only")
    if kind == "yarn":
        if not factor:
            raise CheckpointError(f"{where} sets {prefix}scaling.type='yarn' without {prefix}scaling.factor")
        ext = get("scaling.yarn_ext_factor")
        if ext is not None and float(ext) != 1.0:
            raise CheckpointError(f"{where} sets {prefix}scaling.yarn_ext_factor={ext!r}: shardline "
                                  "runs yarn as transformers does (an extrapolation factor of 1)")
        out = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                          ("yarn_attn_factor", "attention_factor")):
            if get(f"scaling.{key}") is not None:
                out[name] = float(get(f"scaling.{key}"))
        if get("scaling.yarn_log_multiplier"):  # llama.cpp: mscale 1, mscale_all_dim = this
            out.update(mscale=1.0, mscale_all_dim=float(get("scaling.yarn_log_multiplier")))
    elif factor not in (None, 1.0):
        if kind == "none":
            raise CheckpointError(f"{where} sets {prefix}scaling.type='none' with scaling factor "
                                  f"{factor!r}: which one holds is not clear")
        out = {"rope_type": "linear", "factor": factor}
    else:
        out = {"rope_type": "default"}
    if "rope_freqs.weight" in vectors:
        if arch in ("gemma2", "gemma3"):
            raise CheckpointError(f"{where} holds rope_freqs.weight, which shardline (as llama.cpp) "
                                  f"does not read for architecture {arch!r}")
        out["freq_factors"] = vectors["rope_freqs.weight"]
    return None if out == {"rope_type": "default"} else out


def _read_gguf_config(gguf_file: pathlib.Path) -> HFConfig:
    """A config from a GGUF file's metadata (llama.cpp key names)."""
    from shardline.model.errors import CheckpointError

    try:
        from shardline.model.gguf_reader import Metadata, gguf_files, read_vector

        reader = Metadata(gguf_file)  # no gguf-py: the vocabulary's length, not its tokens
        fields = {name: field.contents() for name, field in reader.fields.items()
                  if not name.startswith("tokenizer.ggml.")}
        tensor_names: set[str] = set()
        vectors: dict[str, list[float]] = {}  # rope frequency factors, read here (a few floats)
        for part in gguf_files(gguf_file):  # a split model's other parts hold tensors only
            for tensor in (reader if part == str(gguf_file) else Metadata(part)).tensors:
                tensor_names.add(tensor.name)
                if tensor.name in _GGUF_ROPE_TENSORS:
                    vectors[tensor.name] = read_vector(part, tensor)
        vocab = reader.fields.get("tokenizer.ggml.tokens")
        vocab_size = len(vocab.data) if vocab is not None else None
    except Exception as exc:  # the reader raises assorted types on bad bytes
        raise CheckpointError(f"corrupt GGUF file {str(gguf_file)!r}: {exc}") from exc
    arch = fields.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(
            f"GGUF file {str(gguf_file)!r} holds a {arch!r} model; supported: "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    values: dict[str, Any] = {"model_type": arch, "architectures": [GGUF_ARCHITECTURES[arch]]}
    if arch in ("llama", "mistral") and fields.get(f"{arch}.expert_count"):
        values["architectures"] = ["MixtralForCausalLM"]  # llama.cpp writes Mixtral as llama
    for key, attr in _GGUF_KEYS.items():
        if f"{arch}.{key}" in fields:
            values[attr] = fields[f"{arch}.{key}"]
    values.setdefault("vocab_size", vocab_size)
    values = {**_GGUF_ARCH_DEFAULTS.get(arch, {}), **values}
    where = f"GGUF file {str(gguf_file)!r}"
    heads = values.get("num_attention_heads")
    head_dim = values.get("head_dim") or (
        int(values["hidden_size"]) // int(heads) if heads and values.get("hidden_size") else None)
    rotary = fields.get(f"{arch}.rope.dimension_count")
    if rotary is not None and head_dim is not None and int(rotary) != int(head_dim):
        raise CheckpointError(f"{where} sets {arch}.rope.dimension_count={rotary} for heads of "
                              f"{head_dim}: partial rotary embeddings are not supported")
    values["rope_scaling"] = _gguf_rope_scaling(where, arch, fields, vectors, head_dim)
    swa_base = fields.get(f"{arch}.rope.freq_base_swa")
    if arch == "gemma3" and swa_base is not None:  # its sliding layers' own base, unscaled
        values["rope_local_base_freq"] = swa_base
    elif swa_base is not None and swa_base != values.get("rope_theta", swa_base):
        raise CheckpointError(f"{where} sets {arch}.rope.freq_base_swa={swa_base!r}: a rope base of "
                              "the sliding-window layers of their own is read for gemma3 only")
    if arch in ("gemma2", "gemma3") and values.get("num_attention_heads"):
        # as llama.cpp: queries scaled by head_dim^-0.5, by (hidden / heads)^-0.5 for the 27B
        # models (46 / 62 layers), which is what the checkpoints' query_pre_attn_scalar says
        per_head = int(values["hidden_size"]) // int(values["num_attention_heads"])
        big = values.get("num_hidden_layers") == {"gemma2": 46, "gemma3": 62}[arch]
        values["query_pre_attn_scalar"] = per_head if big else values.get("head_dim") or per_head
    values["tie_word_embeddings"] = "output.weight" not in tensor_names
    values["attention_bias"] = False
    for key, attr in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{key}" in reader.fields:
            values[attr] = reader.fields[f"tokenizer.ggml.{key}"].contents()
    missing = [a for a in ("num_hidden_layers", "hidden_size", "intermediate_size",
                           "num_attention_heads", "vocab_size") if values.get(a) is None]
    if missing:
        raise CheckpointError(f"GGUF file {str(gguf_file)!r} lacks metadata for {missing}")
    return HFConfig(**values)


# -- what the model code reads from a config, checked here without torch (the engine's process
# refuses an unsupported setting before any worker starts) -------------------------------------

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


def layer_types(hf_config: Any) -> list[str]:
    """Each decoder layer's attention kind, `full_attention` or `sliding_attention`.

    transformers 5 configs list them (`layer_types`); older ones say it through
    `sliding_window_pattern` (Gemma 3: every n-th layer global), Gemma 2's alternation, or
    `use_sliding_window` + `max_window_layers` (Mistral, Qwen2: every layer from that index).
    """
    num_layers = int(hf_config.num_hidden_layers)
    listed = getattr(hf_config, "layer_types", None)
    if listed:
        if len(listed) != num_layers or any(t not in (FULL_ATTENTION, SLIDING_ATTENTION) for t in listed):
            raise ValueError(f"layer_types={listed!r} must name {FULL_ATTENTION!r} or "
                             f"{SLIDING_ATTENTION!r} for each of the {num_layers} layers")
        return list(listed)
    window = getattr(hf_config, "sliding_window", None)
    model_type = getattr(hf_config, "model_type", "")
    if not window:
        return [FULL_ATTENTION] * num_layers
    if model_type in ("gemma3", "gemma3_text"):
        pattern = int(getattr(hf_config, "sliding_window_pattern", None) or 6)
        return [SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(num_layers)]
    if model_type == "gemma2":
        return [SLIDING_ATTENTION if (i + 1) % 2 else FULL_ATTENTION for i in range(num_layers)]
    if not getattr(hf_config, "use_sliding_window", True):
        return [FULL_ATTENTION] * num_layers
    first = int(getattr(hf_config, "max_window_layers", None) or 0) if model_type.startswith("qwen") else 0
    return [SLIDING_ATTENTION if i >= first else FULL_ATTENTION for i in range(num_layers)]


def sliding_windows(hf_config: Any) -> list[int | None]:
    """Each layer's sliding window in tokens (a query sees itself and the window - 1 before
    it, as transformers masks), None for a global layer."""
    window = getattr(hf_config, "sliding_window", None)
    return [int(window) if kind == SLIDING_ATTENTION and window else None
            for kind in layer_types(hf_config)]


def uniform_sliding_window(hf_config: Any) -> int | None:
    """The window every layer attends over, or None when some layer is global (Gemma's mixed
    layers) or there is none: only then may the engine give back the KV blocks before a
    request's window (engine/kv_cache.py)."""
    windows = set(sliding_windows(hf_config))
    return next(iter(windows)) if len(windows) == 1 and None not in windows else None


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")


def rope_parameters(hf_config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The checkpoint's rope settings as one dict with `rope_type` and `rope_theta` (for the
    layers of `layer_type` where they differ by layer kind, as Gemma 3's do).

    Reads transformers 5's `rope_parameters` (flat, or one dict per layer kind) and the older
    `rope_theta` + `rope_scaling` (+ Gemma 3's `rope_local_base_freq` for sliding layers).
    """
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        params = params.get(layer_type or FULL_ATTENTION) or params.get(FULL_ATTENTION)
    local_base = getattr(hf_config, "rope_local_base_freq", None)
    if isinstance(params, dict) and "rope_theta" in params:
        out = dict(params)
    elif layer_type == SLIDING_ATTENTION and local_base is not None:
        out = {"rope_type": "default", "rope_theta": local_base}
    else:
        out = dict(getattr(hf_config, "rope_scaling", None) or {})
        out["rope_theta"] = getattr(hf_config, "rope_theta", None) or 10000.0
    out["rope_type"] = out.get("rope_type") or out.get("type") or "default"
    if out.get("original_max_position_embeddings") is None:
        out["original_max_position_embeddings"] = (
            getattr(hf_config, "original_max_position_embeddings", None)
            or getattr(hf_config, "max_position_embeddings", None))
    out.setdefault("max_position_embeddings", getattr(hf_config, "max_position_embeddings", None))
    return out


def check_rope_parameters(params: dict[str, Any], where: str = "rope_scaling") -> None:
    """Refuse (ValueError naming key and value) rope settings this module cannot reproduce."""
    rope_type = params.get("rope_type")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{where}.rope_type={rope_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    partial = params.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0):
        raise ValueError(f"{where}.partial_rotary_factor={partial!r} is not supported (only 1.0)")
    factors = params.get("freq_factors")
    if factors is not None and rope_type not in ("default", "linear", "yarn"):
        raise ValueError(f"{where}.freq_factors (a GGUF file's rope_freqs.weight) is not supported "
                         f"with rope_type={rope_type!r}; supported with default, linear, yarn")
    required = {"linear": ("factor",), "dynamic": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
                "yarn": ("factor",), "longrope": ("long_factor", "short_factor")}
    for key in required.get(rope_type, ()):
        if params.get(key) is None:
            raise ValueError(f"{where}.{key} is required for rope_type={rope_type!r}")
    if rope_type in ("yarn", "longrope", "dynamic") and not params.get("original_max_position_embeddings"):
        raise ValueError(f"{where}.original_max_position_embeddings is required for "
                         f"rope_type={rope_type!r}")


def num_experts_of(hf_config: Any) -> int:
    """How many routed experts each MoE layer has (0 for a dense model): `num_experts`
    (Qwen's config.json) or `num_local_experts` (Mixtral's, and transformers 5's for both)."""
    return int(getattr(hf_config, "num_experts", None) or getattr(hf_config, "num_local_experts", None) or 0)


def check_expert_split(num_experts: int, ep_size: int) -> None:
    """ValueError naming the numbers when `num_experts` cannot be spread over `ep_size` ranks."""
    if ep_size > num_experts or num_experts % ep_size:
        raise ValueError(
            f"expert parallelism over {ep_size} ranks cannot split num_experts={num_experts} "
            f"evenly ({num_experts} % {ep_size} = {num_experts % ep_size}); use a "
            f"tensor_parallel_size that divides {num_experts}, or no expert parallelism"
        )


def check_supported_config(hf_config: Any) -> None:
    """ValueError naming the config key and value when a setting cannot be run as the model
    defines it (an unknown rope type, partial rotary, a malformed `layer_types`)."""
    kinds = set(layer_types(hf_config))
    for kind in sorted(kinds):
        params = rope_parameters(hf_config, kind)
        where = "rope_parameters" if getattr(hf_config, "rope_parameters", None) else "rope_scaling"
        check_rope_parameters(params, where)
    partial = getattr(hf_config, "partial_rotary_factor", None)
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor={partial!r} is not supported (only 1.0)")


def _architecture_of(hf_config: Any) -> str:
    archs = getattr(hf_config, "architectures", None) or []
    if archs:
        return str(archs[0])
    model_type = getattr(hf_config, "model_type", None)
    if model_type in GGUF_ARCHITECTURES:
        return GGUF_ARCHITECTURES[model_type]
    raise ValueError(
        f"config has no 'architectures' entry (model_type={model_type!r}); pass architecture="
    )
