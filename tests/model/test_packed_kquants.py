"""GGUF K-quant weights (Q4_K, Q5_K, Q6_K) in the packed decode GEMM's integer panels with
float32 scales (model/packed_linear.py `gguf_scaled_blocks`, `pack_scaled_blocks`;
csrc/cpu_gemm.cpp): the values are gguf-py's `dequantize` bit for bit, the GEMM equals the
float32 panels of those values bit for bit for 1-256 rows, and a tiny Llama GGUF in a
Q4_K_M-like mix, packed so, still computes what transformers does on the same file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shardline.model import packed_linear, paged_decode
from shardline.model.config import ModelConfig
from shardline.model.gguf_weights import TYPES, GGUFLinearWeight, GGUFTensor
from shardline.model.parallel_context import ParallelContext
from support.gguf_models import (
    gguf_py_values,
    greedy_pair,
    prefill_logits,
    quantized_bytes,
    write_tiny_llama_gguf,
)

pytestmark = pytest.mark.skipif(not paged_decode.KERNEL.load(), reason="the CPU kernels do not build here")

# Each K type's float16 fields (byte offsets in a super-block): d (and dmin).
F16_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
LAYOUTS = {"Q4_K": (torch.uint8, 768), "Q5_K": (torch.uint8, 1280), "Q6_K": (torch.int8, 1280)}
ROWS = (1, 2, 3, 5, 8, 9, 16, 17, 31, 64, 100, 256)  # 1-16: direct tiles; 17 on: float32 slices


def random_tensor(type_name: str, rows: int, cols: int, seed: int, wild: bool = False) -> GGUFTensor:
    """Random valid blocks; `wild`: d and dmin random finite float16 bits too (negative,
    subnormal, large), not only the bounded positive ones `quantized_bytes` sets."""
    rng = np.random.default_rng(seed)
    raw = quantized_bytes(rng.normal(0, 0.05, size=(rows, cols)), type_name, rng)
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(rows, -1)
    if wild:
        _, block, nbytes = TYPES[type_name]
        blocks = raw.reshape(-1, nbytes)
        for at in F16_FIELDS[type_name]:
            bits = rng.integers(0, 1 << 16, size=blocks.shape[0], dtype=np.uint16)
            bits = np.where((bits & 0x7C00) == 0x7C00, bits & 0xBFFF, bits)  # no inf / nan
            blocks[:, at : at + 2] = bits.view(np.uint8).reshape(-1, 2)
    return GGUFTensor("w", TYPES[type_name][0], (rows, cols), torch.from_numpy(raw))


def rebuilt(blocks: packed_linear.ScaledBlocks) -> torch.Tensor:
    """w = d' * q + m' in float32, as the kernel computes it."""
    d, d2, m, q = blocks
    n, k = q.shape
    per = d.repeat_interleave(32, 1)
    if d2 is not None:
        first = (torch.arange(k) % 32 < 16)[None, :]
        per = torch.where(first, per, d2.repeat_interleave(32, 1))
    offset = torch.full_like(per, -0.0) if m is None else m.repeat_interleave(32, 1)
    return per * q.float() + offset


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("wild", [False, True])
def test_scaled_blocks_are_gguf_py_dequantize_bit_for_bit(type_name, wild):
    t = random_tensor(type_name, 45, 768, seed=7, wild=wild)
    blocks = packed_linear.gguf_scaled_blocks(t)
    assert blocks is not None
    want = gguf_py_values(t)
    assert torch.equal(bits(rebuilt(blocks)), bits(want))  # -0.0 included
    packed = packed_linear.pack_scaled_blocks(blocks)
    dtype, nbytes = LAYOUTS[type_name]
    assert packed.dtype == dtype and packed.shape == (2, 768 // 32, nbytes)
    # A row-parallel shard (whole super-blocks of columns: rows of the bytes further apart).
    shard = t.narrow(1, 256, 512)
    assert torch.equal(bits(rebuilt(packed_linear.gguf_scaled_blocks(shard))), bits(want[:, 256:]))
    # The kernel's own values: x = I picks out each weight (w * 1 plus zeros).
    eye = torch.eye(256)
    for k0 in range(0, 768, 256):
        x = torch.zeros(256, 768)
        x[:, k0 : k0 + 256] = eye
        got = packed_linear.linear(x, want, None, packed)
        assert torch.equal(got, want[:, k0 : k0 + 256].T)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("n,k", [(40, 256), (101, 512), (96, 1536)])
def test_scaled_blocks_compute_what_float32_panels_do_bit_for_bit(type_name, n, k, two_threads):
    t = random_tensor(type_name, n, k, seed=n + k, wild=n == 101)
    blocks = packed_linear.gguf_scaled_blocks(t)
    assert blocks is not None
    packed = packed_linear.pack_scaled_blocks(blocks)
    weight = gguf_py_values(t)
    floats = packed_linear.pack_weight(weight)
    gen = torch.Generator().manual_seed(k)
    bias = torch.randn(n, generator=gen)
    for rows in ROWS:
        x = torch.randn(rows, k, generator=gen)
        for b in (None, bias):
            got = packed_linear.linear(x, weight, b, packed)
            assert torch.equal(got, packed_linear.linear(x, weight, b, floats)), rows
            if n != 101:  # wild scales: sums of huge terms, no useful tolerance
                torch.testing.assert_close(got, x @ weight.T + (0 if b is None else b),
                                           rtol=1e-4, atol=1e-4)
    strided = torch.randn(3, 2 * k, generator=gen)[:, ::2]
    assert torch.equal(packed_linear.linear(strided, weight, None, packed),
                       packed_linear.linear(strided, weight, None, floats))


# Fused weights mixing types: one layout for all their parts.
@pytest.mark.parametrize("types,layout", [
    (("Q4_K", "Q6_K", "Q4_K"), (torch.uint8, 1408)),  # two d and an m
    (("Q4_K", "Q5_K"), (torch.uint8, 1280)),
    (("Q6_K", "Q8_0"), (torch.int8, 1280)),  # Q8_0's d is its second d too, no m
    (("Q4_K", "Q4_1"), (torch.uint8, 768)),  # q 0..15 both: nibbles
    (("Q4_K", "Q4_0"), (torch.uint8, 1280)),  # Q4_0's q - 8 is negative: int8
])
def test_fused_weights_of_mixed_types_take_one_layout(types, layout, two_threads):
    rows = (32, 16, 24)[: len(types)]
    parts, first = [], 0
    for i, (type_name, count) in enumerate(zip(types, rows, strict=True)):
        parts.append((first, random_tensor(type_name, count, 512, seed=i, wild=i == 0)))
        first += count
    weight = GGUFLinearWeight(first + 5, 512, parts)  # 5 rows no part covers: 0 (a head's padding)
    blocks = packed_linear._weight_scaled_blocks(weight)
    assert blocks is not None
    dense = torch.zeros(first + 5, 512)
    for row, part in parts:
        dense[row : row + part.shape[0]] = gguf_py_values(part)
    assert torch.equal(rebuilt(blocks), dense)
    packed = packed_linear.pack_scaled_blocks(blocks)
    assert (packed.dtype, packed.shape[2]) == layout
    floats = packed_linear.pack_weight(dense)
    gen = torch.Generator().manual_seed(3)
    for count in (1, 7, 16, 40, 256):
        x = torch.randn(count, 512, generator=gen)
        assert torch.equal(packed_linear.linear(x, dense, None, packed),
                           packed_linear.linear(x, dense, None, floats))


def test_packing_a_model_in_row_slices_gives_the_whole_weights_panels(tmp_path, monkeypatch):
    """pack_gguf_weights packs K-quant weights straight into its buffer `_K_ROWS` output rows at
    a time: with slices of 96 rows (a fused qkv's parts end at 256 and 384, inside slices), the
    panels are those of the whole weight packed at once, in the form the types give."""
    from shardline.model.loader import load_model

    more = {"blk.0.attn_k.weight": "Q4_1", "blk.0.ffn_gate.weight": "Q8_0", "blk.0.attn_output.weight": "Q4_1"}
    path = write_tiny_llama_gguf(tmp_path / "m.gguf", "Q4_K", seed=3, tied=True, types=mix_of(1) | more)
    model = load_model(ModelConfig.from_path(str(path)), ParallelContext.single())
    weights = {name: m.packed_weight for name, m in model.named_modules()
               if isinstance(getattr(m, "packed_weight", None), GGUFLinearWeight)}
    monkeypatch.setattr(packed_linear, "_K_ROWS", 96)
    assert packed_linear.pack_gguf_weights(model) > 0
    modules = dict(model.named_modules())
    forms = {}
    for name, weight in weights.items():
        scaled = packed_linear._weight_scaled_blocks(weight)
        if scaled is None:  # Q4_0 / Q4_1 / Q8_0 alone: float16 scales, as before
            whole = packed_linear.pack_blocks(packed_linear._weight_integer_blocks(weight))
        else:
            whole = packed_linear.pack_scaled_blocks(scaled)
        got = modules[name].packed_weight
        assert got.dtype == whole.dtype and torch.equal(got.view(torch.uint8), whole.view(torch.uint8)), name
        forms[name] = (got.dtype, got.shape[2])
    assert forms["model.layers.1.self_attn.qkv_proj"] == (torch.uint8, 768)  # Q4_K alone
    assert {name: form for name, form in forms.items() if "layers.1" not in name} == {"model.layers.0.self_attn.qkv_proj": (torch.uint8, 1408),  # Q4_K, Q4_1, Q6_K
                     "model.layers.0.self_attn.o_proj": (torch.uint8, 640),  # Q4_1 alone
                     "model.layers.0.mlp.gate_up_proj": (torch.uint8, 1280),  # Q8_0 + Q4_K: int8 q
                     "model.layers.0.mlp.down_proj": (torch.int8, 1280), "lm_head": (torch.int8, 1280)}


def test_weights_without_a_k_quant_part_keep_their_paths():
    q4_0 = random_tensor("Q4_0", 32, 256, seed=1)
    assert packed_linear._weight_scaled_blocks(GGUFLinearWeight(32, 256, [(0, q4_0)])) is None
    mixed = [(0, random_tensor("Q4_K", 32, 256, seed=1)), (32, random_tensor("Q3_K", 32, 256, seed=2))]
    assert packed_linear._weight_scaled_blocks(GGUFLinearWeight(64, 256, mixed)) is None  # no panel form


def mix_of(layers: int) -> dict[str, str]:
    """A Q4_K_M-like mix for `write_tiny_llama_gguf`: Q4_K (its default), Q6_K for the (tied)
    embedding table and layer 0's attn_v and ffn_down, Q5_K for layer 1's attn_output."""
    types = {"token_embd.weight": "Q6_K", "blk.0.attn_v.weight": "Q6_K", "blk.0.ffn_down.weight": "Q6_K"}
    if layers > 1:
        types["blk.1.attn_output.weight"] = "Q5_K"
    return types


def test_a_q4_k_m_like_llama_gguf_packed_equals_transformers(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    path = write_tiny_llama_gguf(tmp_path / "m.gguf", "Q4_K", seed=5, tied=True, types=mix_of(2))
    config = ModelConfig.from_path(str(path))
    monkeypatch.setenv("SHARDLINE_HOME", str(tmp_path / "home"))  # no packed cache from elsewhere
    model, info = packed_linear.load_packed_model(config, ParallelContext.single())
    layers = model.model.layers
    forms = {
        "qkv0": layers[0].self_attn.qkv_proj.packed_weight,  # Q4_K q, k + Q6_K v: two d and an m
        "qkv1": layers[1].self_attn.qkv_proj.packed_weight,
        "o1": layers[1].self_attn.o_proj.packed_weight,
        "down0": layers[0].mlp.down_proj.packed_weight,
        "gate_up0": layers[0].mlp.gate_up_proj.packed_weight,
        "head": model.lm_head.packed_weight,
    }
    shapes = {name: (w.dtype, w.shape[2]) for name, w in forms.items()}
    assert shapes == {"qkv0": (torch.uint8, 1408), "qkv1": (torch.uint8, 768), "o1": (torch.uint8, 1280),
                      "down0": (torch.int8, 1280), "gate_up0": (torch.uint8, 768), "head": (torch.int8, 1280)}
    assert info["packed"] == sum(w.numel() for w in forms.values()) + sum(
        getattr(m, name).packed_weight.numel() for layer in layers for m, name in
        ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj"), (layer.mlp, "gate_up_proj"))
        if not any(getattr(m, name).packed_weight is w for w in forms.values()))
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    ids = [1, 45, 12, 7, 260, 2, 99, 17]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    got = prefill_logits(model, ids)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
    seq, seq_ref = greedy_pair(ref, model, ids)
    assert seq == seq_ref
    # SHARDLINE_CPU_GGUF_KQUANTS=gguf_gemm keeps them in the file's blocks, run by gguf_gemm.
    monkeypatch.setenv(packed_linear.KQUANT_ENV, "gguf_gemm")
    kept, info = packed_linear.load_packed_model(config, ParallelContext.single())
    assert isinstance(kept.model.layers[0].self_attn.qkv_proj.packed_weight, GGUFLinearWeight)
    assert info["packed"] == 0
    torch.testing.assert_close(prefill_logits(kept, ids), got, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv(packed_linear.KQUANT_ENV, "dequantize")
    with pytest.raises(ValueError, match=packed_linear.KQUANT_ENV):
        packed_linear.load_packed_model(config, ParallelContext.single())


async def test_engine_decodes_a_q4_k_m_like_gguf_as_transformers(tmp_path, monkeypatch):
    """Through the Engine (the C++ decoder loop over the packed K-quant panels, a fused qkv of
    two d and an m included): greedy tokens equal transformers' on the same file."""
    from transformers import AutoModelForCausalLM

    from shardline.engine import Engine, EngineConfig, SamplingParams

    monkeypatch.setenv("SHARDLINE_PACKED_CACHE", "off")
    path = write_tiny_llama_gguf(tmp_path / "m.gguf", "Q4_K", seed=6, tied=True, types=mix_of(2))
    prompt = [1, 45, 12, 7, 260, 2, 99, 17, 33]
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    cfg = EngineConfig(model=str(path), transport="inproc", max_model_len=128, num_kv_blocks=64)
    async with await Engine.start(cfg) as engine:
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        outputs = [out async for out in engine.generate(prompt, params)]
    assert outputs[-1].token_ids == want


async def test_tp2_engine_packs_its_shards_and_decodes_as_transformers(tmp_path, monkeypatch):
    """TP=2 (each rank packs its rows of the column-parallel weights and its whole super-blocks
    of the row-parallel ones' columns): greedy tokens equal transformers' on the same file."""
    from transformers import AutoModelForCausalLM

    from shardline.engine import Engine, EngineConfig, SamplingParams

    monkeypatch.setenv("SHARDLINE_PACKED_CACHE", "off")
    shape = {"hidden": 512, "intermediate": 1024}  # o_proj's / down_proj's K: 256 / 512 a rank
    path = write_tiny_llama_gguf(tmp_path / "m.gguf", "Q4_K", seed=2, tied=True, types=mix_of(2), shape=shape)
    prompt = [1, 45, 12, 7, 260, 2, 99]
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    cfg = EngineConfig(model=str(path), max_model_len=128, num_kv_blocks=64, tensor_parallel_size=2)
    async with await Engine.start(cfg) as engine:
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        outputs = [out async for out in engine.generate(prompt, params)]
    assert outputs[-1].token_ids == want
