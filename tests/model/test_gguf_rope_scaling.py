"""Rope scaling read from GGUF files as llama.cpp runs it, against transformers built from the
Hugging Face config the file was converted from (transformers' own GGUF loader does not read
`rope_freqs.weight`, so it is no reference here):

- `rope_freqs.weight` (Llama 3.1+: the llama3 scaling as per-dimension factors, computed as
  llama.cpp's converter does) divides each inverse frequency: logits equal a transformers
  `llama3` model within 1e-4 relative on a prompt that runs far past
  `original_max_position_embeddings`, over frequencies of all three llama3 bands; greedy tokens
  equal; the same file with the factors left out is far off (so the comparison can fail);
- `rope.scaling.type` linear (or a factor without a type, llama.cpp's default, or the old
  `rope.scale_linear`) and yarn (factor, original context length, beta fast/slow, attention
  factor) equal transformers' linear / yarn;
- Phi-3's `rope_factors_long/short.weight` + original context length + attention factor are its
  longrope: transformers' logits below the original length; past it the same as shardline on
  the Hugging Face checkpoint (whose longrope switches by position, see layers.py);
- anything else (an unknown rope key or type, partial rotary, factors of the wrong size or
  family) is refused naming the key or tensor, and a plain file still loads."""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any

import numpy as np
import pytest
import torch

from shardline.model import paged_decode
from shardline.model.config import HFConfig, ModelConfig
from shardline.model.errors import CheckpointError
from shardline.model.loader import load_model
from shardline.model.parallel_context import ParallelContext
from support.gguf_from_hf import llama3_rope_freqs, random_hf_model, write_gguf_from_hf
from support.gguf_models import prefill_logits, write_tiny_llama_gguf

pytestmark = pytest.mark.skipif(
    not paged_decode.KERNEL.load(), reason="the CPU kernels do not build here"
)
# 150 positions: past the original context (64) where scaling changes the low frequencies
IDS = [int(i) for i in np.random.default_rng(7).integers(3, 288, size=150)]
ORIGINAL = 64
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": ORIGINAL,
}
THETA = 500000.0


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def _hf_llama(rope_scaling: dict[str, Any] | None, max_position: int = 512) -> Any:
    # head_dim 32: 16 frequencies; with theta 5e5 their wavelengths run 6.3, 14, 32, 74, 167, ...
    # tokens, so against the llama3 bands (< 16: kept, 16-64: smoothed, > 64: / factor) all three
    # are covered
    return random_hf_model(
        "Llama",
        seed=11,
        head_dim=32,
        num_key_value_heads=2,
        max_position_embeddings=max_position,
        rope_theta=THETA,
        rope_scaling=dict(rope_scaling) if rope_scaling else None,
    )


def _check_equal(model: Any, ref: Any, ids: list[int], steps: int = 3) -> float:
    """Relative logit error of `model` (shardline) against `ref` (transformers) on `ids`, after
    checking that `steps` greedy tokens are the same."""
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    got = prefill_logits(model, ids)
    seq_ref, seq = list(ids), list(ids)
    for _ in range(steps):
        with torch.no_grad():
            seq_ref.append(int(ref(torch.tensor([seq_ref])).logits[0, -1].argmax()))
        seq.append(int(prefill_logits(model, seq)[-1].argmax()))
    assert seq == seq_ref
    return _relative_error(got, want)


def test_llama3_rope_freqs_tensor_equals_transformers_llama3(tmp_path: pathlib.Path) -> None:
    ref = _hf_llama(LLAMA3)
    factors = llama3_rope_freqs(32, THETA, LLAMA3)
    assert {1.0, 8.0} < set(factors.tolist()) and len(set(factors.tolist())) > 2  # all three bands
    path = write_gguf_from_hf(
        tmp_path / "m.gguf", ref, "llama", lambda w: w.add_tensor("rope_freqs.weight", factors)
    )
    config = ModelConfig.from_path(str(path))
    assert config.hf_config.rope_scaling == {
        "rope_type": "default",
        "freq_factors": factors.tolist(),
    }
    model = load_model(config, ParallelContext.single())
    assert _check_equal(model, ref, IDS) < 1e-4
    # The comparison sees the factors: the same file run without them is far off.
    plain = dataclasses.replace(
        config, hf_config=HFConfig(**{**vars(config.hf_config), "rope_scaling": None})
    )
    with torch.no_grad():
        want = ref(torch.tensor([IDS])).logits[0]
    ignored = prefill_logits(load_model(plain, ParallelContext.single()), IDS)
    assert _relative_error(ignored, want) > 1e-2


async def test_engine_decodes_a_llama3_rope_freqs_gguf_as_transformers(
    tmp_path: pathlib.Path,
) -> None:
    """The whole engine on the bare file: prefill in chunks, then decode steps whose keys come
    from the KV cache, all past the original context; greedy tokens equal transformers'."""
    from shardline.engine import Engine, EngineConfig, SamplingParams

    ref = _hf_llama(LLAMA3)
    factors = llama3_rope_freqs(32, THETA, LLAMA3)
    path = write_gguf_from_hf(
        tmp_path / "m.gguf", ref, "llama", lambda w: w.add_tensor("rope_freqs.weight", factors)
    )
    prompt = IDS[:100]
    with torch.no_grad():
        want = ref.generate(
            torch.tensor([prompt]),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    cfg = EngineConfig(
        model=str(path),
        transport="inproc",
        max_model_len=256,
        num_kv_blocks=64,
        long_prefill_token_threshold=32,
    )
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    async with await Engine.start(cfg) as engine:
        outputs = [out async for out in engine.generate(prompt, params)]
    assert outputs[-1].token_ids == want


def _linear(w: Any) -> None:
    w.add_string("llama.rope.scaling.type", "linear")
    w.add_float32("llama.rope.scaling.factor", 4.0)


@pytest.mark.parametrize(
    ("scaling", "extra"),
    [
        ({"rope_type": "linear", "factor": 4.0}, _linear),
        # no type: llama.cpp's default is linear
        (
            {"rope_type": "linear", "factor": 4.0},
            lambda w: w.add_float32("llama.rope.scaling.factor", 4.0),
        ),
        # the old key name
        (
            {"rope_type": "linear", "factor": 4.0},
            lambda w: w.add_float32("llama.rope.scale_linear", 4.0),
        ),
        (
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
            lambda w: (
                w.add_rope_scaling_type(__import__("gguf").RopeScalingType.YARN),
                w.add_rope_scaling_factor(4.0),
                w.add_rope_scaling_orig_ctx_len(ORIGINAL),
            ),
        ),
        (
            {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": ORIGINAL,
                "beta_fast": 16.0,
                "beta_slow": 2.0,
                "attention_factor": 1.25,
            },
            lambda w: (
                w.add_rope_scaling_type(__import__("gguf").RopeScalingType.YARN),
                w.add_rope_scaling_factor(4.0),
                w.add_rope_scaling_orig_ctx_len(ORIGINAL),
                w.add_rope_scaling_yarn_beta_fast(16.0),
                w.add_rope_scaling_yarn_beta_slow(2.0),
                w.add_rope_scaling_yarn_attn_factor(1.25),
            ),
        ),
    ],
    ids=["linear", "factor-without-type", "scale_linear", "yarn", "yarn-beta-attention"],
)
def test_linear_and_yarn_rope_scaling_equal_transformers(
    tmp_path: pathlib.Path, scaling: dict[str, Any], extra: Any
) -> None:
    ref = _hf_llama(scaling, max_position=4 * ORIGINAL)
    path = write_gguf_from_hf(tmp_path / "m.gguf", ref, "llama", extra)
    config = ModelConfig.from_path(str(path))
    assert config.hf_config.rope_scaling == scaling
    model = load_model(config, ParallelContext.single())
    assert _check_equal(model, ref, IDS) < 1e-4
    with torch.no_grad():  # the scaling shows in the logits
        plain = _hf_llama(None, max_position=4 * ORIGINAL)(torch.tensor([IDS])).logits[0]
    assert _relative_error(prefill_logits(model, IDS), plain) > 1e-2


def test_yarn_with_rope_freqs_divides_the_yarn_frequencies(tmp_path: pathlib.Path) -> None:
    """llama.cpp applies rope_freqs under any scaling: yarn's frequencies, each over its factor."""
    from shardline.model.layers import rope_frequencies

    factors = llama3_rope_freqs(64, 10000.0, LLAMA3)

    def extra(w: Any) -> None:
        w.add_string("llama.rope.scaling.type", "yarn")
        w.add_float32("llama.rope.scaling.factor", 2.0)
        w.add_tensor("rope_freqs.weight", factors)

    path = write_tiny_llama_gguf(tmp_path / "m.gguf", "F32", extra=extra)
    params = dict(ModelConfig.from_path(str(path)).hf_config.rope_scaling, rope_theta=10000.0)
    assert params["original_max_position_embeddings"] == 256  # the context length, as llama.cpp
    got, _, _, attention = rope_frequencies(64, params, 256)
    del params["freq_factors"]
    yarn, _, _, yarn_attention = rope_frequencies(64, params, 256)
    torch.testing.assert_close(got, yarn / torch.from_numpy(factors))
    assert attention == yarn_attention == pytest.approx(0.1 * math.log(2.0) + 1.0)


def test_yarn_log_multiplier_gives_llama_cpps_attention_factor(tmp_path: pathlib.Path) -> None:
    """`yarn_log_multiplier` is transformers' mscale_all_dim (with mscale 1), as llama.cpp reads it:
    cos/sin scaled by (0.1 ln f + 1) / (0.1 m ln f + 1)."""
    from shardline.model.layers import rope_frequencies

    def extra(w: Any) -> None:
        w.add_string("llama.rope.scaling.type", "yarn")
        w.add_float32("llama.rope.scaling.factor", 4.0)
        w.add_float32("llama.rope.scaling.yarn_log_multiplier", 0.5)

    path = write_tiny_llama_gguf(tmp_path / "m.gguf", "F32", extra=extra)
    scaling = ModelConfig.from_path(str(path)).hf_config.rope_scaling
    assert (scaling["mscale"], scaling["mscale_all_dim"]) == (1.0, 0.5)
    _, _, _, attention = rope_frequencies(64, dict(scaling, rope_theta=10000.0), 256)
    assert attention == pytest.approx((0.1 * math.log(4) + 1) / (0.05 * math.log(4) + 1))


def test_gemma3_linear_scaling_is_its_global_layers_rope(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemma 3 (4B and up) files say `rope.scaling.type` linear: the global layers' rope, as
    the checkpoint's `rope_parameters` say and llama.cpp runs it; the sliding layers keep plain
    rope on their own base (`rope.freq_base_swa` where the file has it, else 10000)."""
    import gguf
    from transformers import Gemma3TextConfig

    from shardline.model.config import FULL_ATTENTION, SLIDING_ATTENTION, rope_parameters
    from support.gguf_arch_models import write_tiny_arch_gguf

    add_base = gguf.GGUFWriter.add_rope_freq_base

    def with_scaling(writer: Any, base: float) -> None:
        add_base(writer, base)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(8.0)
        writer.add_rope_freq_base_swa(20000.0)

    monkeypatch.setattr(gguf.GGUFWriter, "add_rope_freq_base", with_scaling)
    path = write_tiny_arch_gguf(tmp_path / "m.gguf", "gemma3")
    config = ModelConfig.from_path(str(path)).hf_config
    hf = Gemma3TextConfig(
        num_hidden_layers=6,
        max_position_embeddings=256,
        rope_parameters={
            FULL_ATTENTION: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            SLIDING_ATTENTION: {"rope_type": "default", "rope_theta": 20000.0},
        },
    )
    for kind in (FULL_ATTENTION, SLIDING_ATTENTION):
        got, want = rope_parameters(config, kind), rope_parameters(hf, kind)
        keys = ("rope_type", "rope_theta", "factor")
        assert {k: got.get(k) for k in keys} == {k: want.get(k) for k in keys}


def test_phi3_longrope_factors_equal_its_hugging_face_checkpoint(tmp_path: pathlib.Path) -> None:
    import gguf

    short = [1.0 + i / 8 for i in range(8)]
    long = [2.0 + i for i in range(8)]
    scaling = {"rope_type": "longrope", "short_factor": short, "long_factor": long}
    ref = random_hf_model(
        "Phi3",
        seed=5,
        max_position_embeddings=4 * ORIGINAL,
        original_max_position_embeddings=ORIGINAL,
        rope_scaling=dict(scaling),
        bos_token_id=1,
        eos_token_id=2,
    )
    ref.save_pretrained(tmp_path / "hf")
    attn = math.sqrt(1 + math.log(4) / math.log(ORIGINAL))  # as llama.cpp's converter writes it

    def extra(w: Any) -> None:
        w.add_rope_scaling_orig_ctx_len(ORIGINAL)
        w.add_rope_scaling_attn_factors(attn)
        w.add_tensor("rope_factors_long.weight", np.array(long, dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(short, dtype=np.float32))

    path = write_gguf_from_hf(tmp_path / "m.gguf", ref, "phi3", extra)
    del gguf
    config = ModelConfig.from_path(str(path))
    assert config.hf_config.rope_scaling == {
        "rope_type": "longrope",
        "long_factor": long,
        "short_factor": short,
        "original_max_position_embeddings": ORIGINAL,
        "attention_factor": pytest.approx(attn),
    }
    model = load_model(config, ParallelContext.single())
    # below the original length transformers runs the short factors, as shardline does
    assert _check_equal(model, ref, IDS[:60], steps=2) < 1e-4
    # past it: the rotary tables and logits of the Hugging Face checkpoint's longrope
    hf_model = load_model(ModelConfig.from_path(str(tmp_path / "hf")), ParallelContext.single())
    torch.testing.assert_close(
        model.model.rotary_emb.cos_cache, hf_model.model.rotary_emb.cos_cache
    )
    assert _relative_error(prefill_logits(model, IDS), prefill_logits(hf_model, IDS)) < 1e-5
    inv_long = 1.0 / (torch.tensor(long) * 10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    torch.testing.assert_close(
        model.model.rotary_emb.cos_cache[100, :8], torch.cos(100 * inv_long) * attn
    )


def _set(key: str, value: Any) -> Any:
    def extra(w: Any) -> None:
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_float32(key, value)

    return extra


def _set_rope_dims(writer: Any, dims: int) -> None:
    # GGUFWriter refuses a key twice: replace the rope dimension count the helper wrote
    for shard in writer.kv_data:
        if "llama.rope.dimension_count" in shard:
            shard["llama.rope.dimension_count"].value = dims


def _vector(name: str, values: list[float]) -> Any:
    return lambda w: w.add_tensor(name, np.array(values, dtype=np.float32))


def _both(*extras: Any) -> Any:
    return lambda w: [extra(w) for extra in extras]


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (
            _set("llama.rope.scaling.type", "su"),
            r"llama.rope.scaling.type='su'; shardline reads none, linear",
        ),
        (
            _set("llama.rope.scaling.type", "yarn"),
            r"scaling.type='yarn' without llama.rope.scaling.factor",
        ),
        (
            _both(
                _set("llama.rope.scaling.type", "yarn"),
                _set("llama.rope.scaling.factor", 4.0),
                _set("llama.rope.scaling.yarn_ext_factor", 0.5),
            ),
            r"llama.rope.scaling.yarn_ext_factor=0.5",
        ),
        (
            _both(_set("llama.rope.scaling.type", "none"), _set("llama.rope.scaling.factor", 4.0)),
            r"scaling.type='none' with scaling factor 4.0",
        ),
        (_set("llama.rope.scaling.attn_factor", 1.5), r"llama.rope.scaling.attn_factor=1.5"),
        (
            _set("llama.rope.scaling.alpha", 1000.0),
            r"sets llama.rope.scaling.alpha=1000.0: shardline does not read",
        ),
        (_set("llama.rope.freq_base_swa", 1000.0), r"llama.rope.freq_base_swa=1000.0"),
        (
            _vector("rope_freqs.weight", [1.0] * 4),
            r"rope_freqs.weight with 4 values; the rotary dimensions \(64\) need 32",
        ),
        (
            _vector("rope_freqs.weight", [1.0] * 31 + [0.0]),
            r"rope_freqs.weight with a value that is not positive",
        ),
        (_vector("rope_factors_long.weight", [1.0] * 32), r"but not rope_factors_short.weight"),
        (
            _both(
                _vector("rope_factors_long.weight", [1.0] * 32),
                _vector("rope_factors_short.weight", [1.0] * 32),
            ),
            r"rope_factors_long.weight and rope_factors_short.weight with architecture 'llama'",
        ),
        (
            lambda w: _set_rope_dims(w, 4),
            r"llama.rope.dimension_count=4 for heads of 64: partial rotary",
        ),
    ],
)
def test_rope_settings_shardline_cannot_run_are_refused_by_name(
    tmp_path: pathlib.Path, extra: Any, named: str
) -> None:
    """Never plain rope where the file says otherwise: the key or tensor is named."""
    path = write_tiny_llama_gguf(tmp_path / "m.gguf", "F32", extra=extra)
    with pytest.raises(CheckpointError, match=named):
        ModelConfig.from_path(str(path))
    ModelConfig.from_path(
        str(write_tiny_llama_gguf(tmp_path / "plain.gguf", "F32"))
    )  # the plain one loads
