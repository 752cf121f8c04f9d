"""The int8-activation GEMM (csrc/q8_gemm.cpp, model/q8_linear.py) against its definition:
activations quantized per block of 32 (scale amax / 127, round half to even), exact integer dot
products with the weight's q, float scales per block. For every storage the packer picks (q in
0..15 or -8..7 as nibbles, wider q as bytes), 1 to 70 rows (every tile size), output widths that
are not a multiple of the 16-column groups, with and without bias. test_portable_builds runs
these against the AVX2 and baseline x86-64 builds too.

GGUF K-quants at about the file's size (`Q8Weight.from_gguf`): Q4_K, Q5_K and Q6_K blocks with
their integer sub-block scales, each part of a fused weight in its own form, against the same
definition with the d, m and q gguf-py's dequantize gives (`packed_linear.gguf_scaled_blocks`),
and Q4_K's results equal, bit for bit, to the form with float32 d and m it replaces."""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
import torch

from shardline.model import packed_linear, paged_decode
from shardline.model.gguf_weights import TYPES, GGUFLinearWeight, GGUFTensor
from shardline.model.q8_linear import Q8Arena, Q8Weight

pytestmark = pytest.mark.skipif(not paged_decode.KERNEL.load(), reason="the CPU kernels do not build here")


def reference(x: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, q: torch.Tensor,
              d2: torch.Tensor | None = None) -> torch.Tensor:
    """The definition in float32 where the kernel rounds (the scale, x * 127 / amax), exact
    integers for the dot products, float64 for the rest: w = d * q + m per block of 32 inputs,
    with d2 (when given) the d of each block's last 16."""
    rows, k = x.shape
    n = q.shape[0]
    blocks = x.view(rows, k // 32, 32)
    amax = blocks.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))  # float32, as the kernel
    xq = torch.round(blocks * inv.unsqueeze(-1)).long()  # half to even, as nearbyint
    scale = (amax / 127.0).double()
    halves = torch.stack([d, d if d2 is None else d2], -1).double()  # [N, K / 32, 2]
    dots = torch.einsum("rbhi,nbhi->rnbh", xq.view(rows, k // 32, 2, 16), q.view(n, k // 32, 2, 16).long())
    per_block = (halves.unsqueeze(0) * dots.double()).sum(-1)
    if m is not None:
        per_block = per_block + m.double().unsqueeze(0) * xq.sum(-1).double().unsqueeze(1)
    return (scale.unsqueeze(1) * per_block).sum(-1)


@pytest.mark.parametrize(("low", "high"), [(0, 15), (-8, 7), (-127, 127), (0, 31), (-32, 31)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("half_scales", [False, True])
def test_gemm_is_its_integer_definition(low: int, high: int, bias: bool, half_scales: bool) -> None:
    """(float16 scales: d and m float16 values, as Q4_0/Q4_1/Q8_0's, stored as float16; else
    float32, as K-quants' d * sc)"""
    gen = torch.Generator().manual_seed(low * 7 + high)
    n, k = 40, 128
    q = torch.randint(low, high + 1, (n, k), dtype=torch.int8, generator=gen)
    d = torch.rand(n, k // 32, generator=gen) * 0.01 + 0.001
    m = (torch.rand(n, k // 32, generator=gen) - 0.5) * 0.02
    if half_scales:
        d, m = d.half().float(), m.half().float()
    b = torch.randn(n, generator=gen) if bias else None
    weight = Q8Weight.pack(d, m, q)
    half = bool(int(weight.packed[64:72].view(torch.int64)) & 4)  # the first group's kind
    # float16 scales where exact: d and m for 0..15 nibbles (stored as they are); with an offset
    # (q + 8 for -8..7, q + 128 for bytes on VNNI builds) m - offset * d may not be one
    assert half == half_scales if (low, high) == (0, 15) else half <= half_scales
    dense = d.repeat_interleave(32, 1) * q.float() + m.repeat_interleave(32, 1)
    for rows in [*range(1, 18), 33, 70]:
        x = torch.randn(rows, k, generator=gen)
        x[0, :32] = 0.0  # a block of zeros: scale 0, no division by it
        got = weight.matmul(x, b)
        want = reference(x, d, m, q) + (0.0 if b is None else b.double())
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= 2e-6 * scale, rows
        # ... and close to the float32 product (the activations' 8-bit rounding, ~0.5%)
        exact = x @ dense.T + (0.0 if b is None else b)
        assert (got - exact).abs().max().item() <= 0.03 * exact.abs().max().item(), rows


@pytest.mark.parametrize("half_scales", [False, True])
def test_two_scale_blocks_are_their_definition(half_scales: bool) -> None:
    """Q6_K's form: q -32..31, d for each block's first 16 inputs and d2 for the rest."""
    gen = torch.Generator().manual_seed(6)
    n, k = 40, 128
    q = torch.randint(-32, 32, (n, k), dtype=torch.int8, generator=gen)
    d = torch.rand(n, k // 32, generator=gen) * 0.01 + 0.001
    d2 = torch.rand(n, k // 32, generator=gen) * 0.01 + 0.001
    m = torch.zeros(n, k // 32)
    if half_scales:
        d, d2 = d.half().float(), d2.half().float()
    weight = Q8Weight.pack(d, m, q, d2)
    per_input = torch.stack([d, d2], -1).repeat_interleave(16, -1).view(n, k)
    # the definition: each half a block of its own scale
    halves = torch.stack([d, d2], -1).view(n, -1)  # [N, K / 16]
    for rows in (1, 5, 8, 19):
        x = torch.randn(rows, k, generator=gen)
        got = weight.matmul(x, None).double()
        blocks = x.view(rows, k // 32, 32)
        amax = blocks.abs().amax(-1)
        inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
        xq = torch.round(blocks * inv.unsqueeze(-1)).long().view(rows, k // 16, 16)
        dots = torch.einsum("rhi,nhi->rnh", xq, q.view(n, k // 16, 16).long()).double()
        scale = (amax / 127.0).double().repeat_interleave(2, -1)  # [rows, K / 16]
        want = (scale.unsqueeze(1) * halves.double().unsqueeze(0) * dots).sum(-1)
        assert (got - want).abs().max().item() <= 2e-6 * want.abs().max().item(), rows
        exact = x @ (per_input * q.float()).T
        assert (got.float() - exact).abs().max().item() <= 0.03 * exact.abs().max().item()


def test_wrong_shapes_are_refused_naming_them() -> None:
    q = torch.randint(0, 16, (16, 64), dtype=torch.int8)
    weight = Q8Weight.pack(torch.ones(16, 2), None, q)
    with pytest.raises(RuntimeError, match=r"x must be float32 \[M, 64\]"):
        weight.matmul(torch.randn(2, 32), None)
    with pytest.raises(RuntimeError, match="K must be a multiple of 32"):
        Q8Weight.pack(torch.ones(16, 1), None, torch.zeros(16, 48, dtype=torch.int8))


# ------------------------------------------------------- GGUF K-quants at the file's size

K_ROWS = (*range(1, 18), 33, 70, 256)  # every tile size, and 256 (the largest decode batch)


def kquant_part(type_name: str, rows: int, k: int, seed: int) -> GGUFTensor:
    from support.gguf_models import quantized_bytes

    rng = np.random.default_rng(seed)
    raw = quantized_bytes(rng.normal(0, 0.05, size=(rows, k)), type_name, rng)
    return GGUFTensor("w", TYPES[type_name][0], (rows, k), torch.from_numpy(np.ascontiguousarray(raw)))


def definition_of(parts: list[tuple[int, GGUFTensor]], n: int, k: int) -> tuple[torch.Tensor, ...]:
    """(d, m, q, d2) of the parts over n rows (rows no part covers 0), from gguf-py's values
    (`gguf_scaled_blocks`: what dequantize gives, bit for bit, tested in test_packed_kquants)."""
    d, m, d2 = torch.zeros(n, k // 32), torch.zeros(n, k // 32), torch.zeros(n, k // 32)
    q = torch.zeros(n, k, dtype=torch.int8)
    for first, part in parts:
        blocks = packed_linear.gguf_scaled_blocks(part)
        assert blocks is not None
        bd, bd2, bm, bq = blocks
        rows = slice(first, first + part.shape[0])
        d[rows], q[rows] = bd, bq
        d2[rows] = bd if bd2 is None else bd2
        m[rows] = 0.0 if bm is None else bm
    return d, m, q, d2


def check_against_definition(weight: Q8Weight, d: torch.Tensor, m: torch.Tensor, q: torch.Tensor,
                             d2: torch.Tensor, rows_list: tuple[int, ...], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n, k = q.shape
    per_input = torch.stack([d, d2], -1).repeat_interleave(16, -1).view(n, k)
    dense = per_input * q.float() + m.repeat_interleave(32, 1)
    bias = torch.randn(n, generator=gen)
    for rows in rows_list:
        x = torch.randn(rows, k, generator=gen)
        x[0, :32] = 0.0  # a block of zeros: scale 0
        b = bias if rows % 2 else None
        got = weight.matmul(x, b).double()
        want = reference(x, d, m, q, d2) + (0.0 if b is None else b.double())
        assert (got - want).abs().max().item() <= 2e-6 * want.abs().max().item(), rows
        exact = x @ dense.T + (0.0 if b is None else b)
        assert (got.float() - exact).abs().max().item() <= 0.03 * exact.abs().max().item(), rows


# bytes a weight of each form (header and group table aside): the file's, 0.5625 / 0.6875 / 0.8203
KQUANT_BYTES = {"Q4_K": 2304 / 4096, "Q5_K": 2816 / 4096, "Q6_K": 3360 / 4096}


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
def test_kquants_at_file_size_are_their_integer_definition(type_name: str) -> None:
    """One part of one K type, 71 rows (the last group 7 columns), K 768 (3 super-blocks)."""
    n, k = 71, 768
    parts = [(0, kquant_part(type_name, n, k, seed=len(type_name) + ord(type_name[1])))]
    weight = Q8Weight.from_gguf(n, k, [(first, t.type, t.data) for first, t in parts])
    assert weight is not None and weight.group_forms() == [type_name] * 5
    groups = 5
    header = -(-(64 + 16 * groups) // 64) * 64
    assert (weight.nbytes - header) / (groups * 16 * k) == KQUANT_BYTES[type_name]
    check_against_definition(weight, *definition_of(parts, n, k), K_ROWS, seed=1)


def test_q4_k_results_equal_the_float_scale_form_bit_for_bit() -> None:
    """d = D * sc and m = -Dmin * mn formed in the kernel are the float32 products the packer
    stored before (exact), so Q4_K (unsigned nibbles, no offset either way) gives the same
    results as `pack` with float32 d and m, bit for bit."""
    n, k = 48, 512
    part = kquant_part("Q4_K", n, k, seed=9)
    compact = Q8Weight.from_gguf(n, k, [(0, "Q4_K", part.data)])
    d, d2, m, q = packed_linear.gguf_scaled_blocks(part)  # type: ignore[misc]
    wide = Q8Weight.pack(d, m, q, d2)
    assert compact is not None and wide.group_forms() == ["blocks"] * 3
    assert compact.nbytes < 0.8 * wide.nbytes
    gen = torch.Generator().manual_seed(2)
    for rows in (1, 4, 7, 8, 19):
        x = torch.randn(rows, k, generator=gen)
        assert torch.equal(compact.matmul(x, None), wide.matmul(x, None)), rows


def test_fused_weights_keep_each_parts_form() -> None:
    """A fused weight of Q4_K, Q6_K, Q5_K and Q6_K parts (a Q4_K_M file's qkv: v Q6_K), each on
    16-row groups but the last (23 rows, ending the weight), and 16 rows no part covers (0):
    each group in its part's form, the whole its definition."""
    k = 512
    sizes = [("Q4_K", 32), ("Q6_K", 16), ("Q5_K", 48), ("Q6_K", 23)]
    parts, first = [], 16  # rows 0..15: no part
    for i, (type_name, rows) in enumerate(sizes):
        parts.append((first, kquant_part(type_name, rows, k, seed=20 + i)))
        first += rows
    n = first
    weight = Q8Weight.from_gguf(n, k, [(f, t.type, t.data) for f, t in parts])
    assert weight is not None
    assert weight.group_forms() == ["Q4_K"] * 3 + ["Q6_K"] + ["Q5_K"] * 3 + ["Q6_K"] * 2
    check_against_definition(weight, *definition_of(parts, n, k), (1, 3, 8, 17), seed=3)
    x = torch.randn(2, k)
    assert torch.equal(weight.matmul(x, None)[:, :16], torch.zeros(2, 16))


def test_parts_off_group_boundaries_or_of_other_types_take_the_common_form() -> None:
    """Parts of two types meeting inside a 16-row group, or a Q4_0 part beside a Q4_K one:
    `from_gguf` declines; the packer's int8 weight is then the common form (float32 scales),
    still its definition."""
    k = 256
    off = [(0, kquant_part("Q4_K", 24, k, seed=5)), (24, kquant_part("Q6_K", 16, k, seed=6))]
    assert Q8Weight.from_gguf(40, k, [(f, t.type, t.data) for f, t in off]) is None
    weight = packed_linear._q8_weight(GGUFLinearWeight(40, k, off), None, kquants=True)
    assert weight is not None and weight.group_forms() == ["blocks"] * 3
    check_against_definition(weight, *definition_of(off, 40, k), (1, 5), seed=4)
    # parts of one type may share a group (their rows each in their columns)
    same = [(0, off[0][1]), (24, kquant_part("Q4_K", 8, k, seed=9)), (32, off[1][1])]
    shared = Q8Weight.from_gguf(48, k, [(f, t.type, t.data) for f, t in same])
    assert shared is not None and shared.group_forms() == ["Q4_K", "Q4_K", "Q6_K"]
    check_against_definition(shared, *definition_of(same, 48, k), (1, 9), seed=5)
    q4_0 = kquant_part("Q4_0", 16, k, seed=7)
    mixed = [(0, kquant_part("Q4_K", 16, k, seed=8)), (16, q4_0)]
    assert Q8Weight.from_gguf(32, k, [(f, t.type, t.data) for f, t in mixed]) is None
    aligned = packed_linear._q8_weight(GGUFLinearWeight(40, k, [(0, off[1][1]), (16, off[0][1])]), None, True)
    assert aligned is not None and aligned.group_forms() == ["Q6_K", "Q4_K", "Q4_K"]


def test_column_shards_of_kquant_parts_are_their_definition() -> None:
    """A tensor-parallel rank's columns of a row-parallel weight: whole super-blocks, its rows
    further apart than its bytes (a strided view of the file's rows)."""
    k = 768
    parts = [(0, kquant_part("Q4_K", 32, k, seed=11).narrow(1, 256, 512)),
             (32, kquant_part("Q6_K", 16, k, seed=12).narrow(1, 256, 512))]
    assert parts[0][1].data.stride(0) > parts[0][1].data.shape[1]
    weight = Q8Weight.from_gguf(48, 512, [(f, t.type, t.data) for f, t in parts])
    assert weight is not None and weight.group_forms() == ["Q4_K", "Q4_K", "Q6_K"]
    check_against_definition(weight, *definition_of(parts, 48, 512), (1, 6), seed=6)


def test_an_arena_holds_what_pack_and_from_gguf_make_one_after_another() -> None:
    """Q8Arena (the worker's one buffer for a model's int8 weights): each weight byte for byte
    what `pack` / `from_gguf` make alone, on 64-byte boundaries one after another, within the
    bound reserved for them."""
    gen = torch.Generator().manual_seed(8)
    shapes = [(40, 128, 0, 15), (33, 256, -127, 127), (16, 64, -8, 7)]
    blocks = []
    for n, k, low, high in shapes:
        q = torch.randint(low, high + 1, (n, k), dtype=torch.int8, generator=gen)
        blocks.append((torch.rand(n, k // 32, generator=gen), torch.rand(n, k // 32, generator=gen) - 0.5, q, None))
    blocks.append((*blocks[1][:3], torch.rand(33, 8, generator=gen)))  # two-scale
    part = kquant_part("Q6_K", 48, 512, seed=2)
    layout = Q8Weight.gguf_layout(48, 512, [(0, "Q6_K", 48)])
    assert layout is not None
    bound = sum(Q8Arena.bound_of(b[2].shape[0], b[2].shape[1]) for b in blocks) + Q8Arena.bound_of(48, 512, layout)
    arena = Q8Arena(bound)
    packed = [arena.pack(*b) for b in blocks]
    compact = arena.from_gguf(48, 512, [(0, "Q6_K", part.data)], layout)
    assert compact is not None
    alone = [Q8Weight.pack(*b) for b in blocks] + [Q8Weight.from_gguf(48, 512, [(0, "Q6_K", part.data)])]
    base = arena.buffer.data_ptr()
    starts = [w.packed.data_ptr() - base for w in [*packed, compact]]
    assert starts[0] == 0 and all(s % 64 == 0 for s in starts) and starts == sorted(starts)
    for got, want in zip([*packed, compact], alone, strict=True):
        assert want is not None and torch.equal(got.packed, want.packed)
    assert arena.used <= bound
    x = torch.randn(3, 512)
    assert torch.equal(compact.matmul(x, None), alone[-1].matmul(x, None))  # type: ignore[union-attr]


def test_kquant_rows_of_the_wrong_type_are_refused_naming_it() -> None:
    part = kquant_part("Q5_K", 16, 256, seed=1)
    packed = torch.ops.shardline.q8_kquant_new(16, 256, [4])
    with pytest.raises(RuntimeError, match="column group 0's type Q4_K 144"):
        torch.ops.shardline.q8_kquant_fill(packed, 0, part.data)
    with pytest.raises(RuntimeError, match="types must be 4"):
        torch.ops.shardline.q8_kquant_new(16, 256, [3])


# ----------------------------------------------------------------- through the engine


async def _prompt_nll(path: str, prompt_ids: list[int] | str, **kw: object) -> tuple[float, list[int]]:
    """Mean negative log-likelihood of a prompt's tokens (prompt logprobs) and 24 greedy tokens."""
    from shardline.engine import Engine, EngineConfig, SamplingParams

    settings: dict[str, object] = {"max_model_len": 2048, "log_stats_interval": 0, **kw}
    cfg = EngineConfig(model=path, **settings)  # type: ignore[arg-type]
    async with await Engine.start(cfg) as engine:
        ids = engine.tokenizer(prompt_ids)["input_ids"] if isinstance(prompt_ids, str) else prompt_ids
        last = None
        async for out in engine.generate(ids, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)):
            last = out
        assert last is not None and last.prompt_logprobs is not None
        scored = [e.logprob for e in last.prompt_logprobs if e is not None]
        tokens: list[int] = []
        async for out in engine.generate(ids[:32], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)):
            tokens = out.token_ids
    return -sum(scored) / len(scored), tokens


FIXED_TEXT = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "DESIGN.md").read_text(encoding="utf-8")[:5000]


async def test_default_model_perplexity_within_one_percent(
    smollm2_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The opt-in mode's accuracy on the default model: perplexity of a fixed text (docs/DESIGN.md,
    ~1,100 tokens) within 1% of the float32 mode's (measured: +0.13%), through the C++ decoder
    loop and the Python layers alike (the decode loop's GEMMs are the same kernel)."""
    monkeypatch.setenv("SHARDLINE_CPU_ACTIVATIONS", "float32")
    exact, exact_tokens = await _prompt_nll(str(smollm2_dir), FIXED_TEXT)
    monkeypatch.setenv("SHARDLINE_CPU_ACTIVATIONS", "int8")
    int8, int8_tokens = await _prompt_nll(str(smollm2_dir), FIXED_TEXT)
    ratio = math.exp(int8) / math.exp(exact)
    assert ratio != 1.0  # the mode is on: activations rounded to 8 bits change the logits ...
    assert abs(ratio - 1.0) <= 0.01, ratio  # ... within 1% in perplexity
    monkeypatch.setenv("SHARDLINE_CPU_DECODER_LOOP", "off")
    _, python_tokens = await _prompt_nll(str(smollm2_dir), FIXED_TEXT[:200])
    monkeypatch.delenv("SHARDLINE_CPU_DECODER_LOOP")
    _, loop_tokens = await _prompt_nll(str(smollm2_dir), FIXED_TEXT[:200])
    assert python_tokens == loop_tokens
    assert len(exact_tokens) == len(int8_tokens) == 24


@pytest.mark.parametrize("type_name", ["Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
async def test_gguf_types_in_int8_mode_stay_close(
    type_name: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tiny random Llama GGUF per type the int8 kernel takes: prompt NLL within 2% of the
    float32 mode's (random weights: larger relative errors than a trained model's)."""
    from support.gguf_models import write_tiny_llama_gguf

    path = str(write_tiny_llama_gguf(tmp_path / "tiny.gguf", type_name, seed=3))
    prompt = list(range(3, 200))
    monkeypatch.setenv("SHARDLINE_CPU_ACTIVATIONS", "float32")
    exact, _ = await _prompt_nll(path, prompt, transport="inproc", max_model_len=256)
    monkeypatch.setenv("SHARDLINE_CPU_ACTIVATIONS", "int8")
    int8, _ = await _prompt_nll(path, prompt, transport="inproc", max_model_len=256)
    assert int8 != exact
    assert abs(int8 - exact) <= 0.02 * exact


async def test_a_wrong_switch_value_is_refused_naming_it(
    tiny_llama_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shardline.engine import Engine, EngineConfig

    monkeypatch.setenv("SHARDLINE_CPU_ACTIVATIONS", "int4")
    with pytest.raises(Exception, match=r"SHARDLINE_CPU_ACTIVATIONS='int4': expected one of auto, float32, int8"):
        await Engine.start(EngineConfig(model=str(tiny_llama_dir), max_model_len=64))
    monkeypatch.setenv("SHARDLINE_CPU_ACTIVATIONS", "int8")
    _, tokens = await _prompt_nll(str(tiny_llama_dir), [5, 6, 7], max_model_len=64)
    assert len(tokens) == 24


@pytest.mark.parametrize("mix", ["Q4_1", "Q4_K_M-like"])
async def test_tensor_parallel_shards_take_the_int8_kernel_too(
    mix: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TP=2 over a Q4_1 GGUF, or a Q4_K_M-like one (K-quant shards at the file's size: rows of
    the column-parallel weights, whole super-blocks of the row-parallel ones' columns, rows
    further apart than a shard's bytes), in int8 mode: each rank's shard (whole blocks of 32
    inputs, so the same activation blocks) takes the int8 kernel; the prompt NLL is TP=1's up
    to the float order of the all-reduce, and the greedy tokens are equal."""
    from support.gguf_models import write_tiny_llama_gguf

    if mix == "Q4_1":
        path = str(write_tiny_llama_gguf(tmp_path / "tiny.gguf", "Q4_1", seed=4))
    else:
        types = {"token_embd.weight": "Q6_K", "blk.0.attn_v.weight": "Q6_K", "blk.0.ffn_down.weight": "Q6_K",
                 "blk.1.attn_output.weight": "Q5_K"}
        shape = {"hidden": 512, "intermediate": 1024}  # o_proj's / down_proj's K: 256 / 512 a rank
        path = str(write_tiny_llama_gguf(tmp_path / "tiny.gguf", "Q4_K", seed=4, types=types, shape=shape))
    prompt = list(range(3, 120))
    monkeypatch.setenv("SHARDLINE_CPU_ACTIVATIONS", "int8")
    one, one_tokens = await _prompt_nll(path, prompt, max_model_len=256)
    two, two_tokens = await _prompt_nll(path, prompt, max_model_len=256, tensor_parallel_size=2)
    monkeypatch.setenv("SHARDLINE_CPU_ACTIVATIONS", "float32")
    exact, _ = await _prompt_nll(path, prompt, max_model_len=256, tensor_parallel_size=2)
    assert abs(two - one) <= 1e-4 * one and two_tokens == one_tokens
    assert two != exact  # (the int8 kernel ran on the shards)


async def test_int8_asked_of_a_model_it_cannot_take_says_so(
    tiny_llama_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A float checkpoint (random float32 weights, no integer blocks): the worker warns, naming
    the switch, that nothing took the int8 kernel, and serves as without it."""
    monkeypatch.setenv("SHARDLINE_CPU_ACTIVATIONS", "int8")
    with caplog.at_level("WARNING", logger="shardline.worker"):
        _, tokens = await _prompt_nll(str(tiny_llama_dir), [5, 6, 7], max_model_len=64, transport="inproc")
    assert len(tokens) == 24
    assert any("SHARDLINE_CPU_ACTIVATIONS=int8, but no linear layer" in r.getMessage() for r in caplog.records)


def test_a_q4_k_m_like_file_packs_each_part_in_its_form(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Q4_K_M-like tiny Llama (Q4_K; Q6_K tied embedding / LM head, layer 0's attn_v and
    ffn_down; Q5_K layer 1's attn_output) loaded as a worker does in int8 mode: layer 0's fused
    qkv keeps q and k in Q4_K's form and v in Q6_K's, the start-up's bytes are the weights' own,
    and the logits are the float32 mode's up to the activations' 8-bit rounding."""
    from shardline.model.config import ModelConfig
    from shardline.model.parallel_context import ParallelContext
    from support.gguf_models import prefill_logits, write_tiny_llama_gguf

    types = {"token_embd.weight": "Q6_K", "blk.0.attn_v.weight": "Q6_K", "blk.0.ffn_down.weight": "Q6_K",
             "blk.1.attn_output.weight": "Q5_K"}
    path = write_tiny_llama_gguf(tmp_path / "m.gguf", "Q4_K", seed=5, tied=True, types=types)
    config = ModelConfig.from_path(str(path))
    monkeypatch.setenv("SHARDLINE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SHARDLINE_CPU_ACTIVATIONS", "int8")
    model, info = packed_linear.load_packed_model(config, ParallelContext.single())
    layers = model.model.layers
    forms = {
        "qkv0": layers[0].self_attn.qkv_proj.packed_weight.group_forms(),
        "o1": set(layers[1].self_attn.o_proj.packed_weight.group_forms()),
        "down0": set(layers[0].mlp.down_proj.packed_weight.group_forms()),
        "gate_up1": set(layers[1].mlp.gate_up_proj.packed_weight.group_forms()),
        "head": set(model.lm_head.packed_weight.group_forms()),
    }
    assert forms == {"qkv0": ["Q4_K"] * 24 + ["Q6_K"] * 8, "o1": {"Q5_K"}, "down0": {"Q6_K"},
                     "gate_up1": {"Q4_K"}, "head": {"Q6_K"}}
    weights = [w for m in model.modules() if isinstance(w := getattr(m, "packed_weight", None), Q8Weight)]
    assert info["int8_layers"] == len(weights) == 9 and info["packed"] == sum(w.nbytes for w in weights)
    assert len({w.packed.untyped_storage().data_ptr() for w in weights}) == 1  # one (huge-page) buffer
    ids = [1, 45, 12, 7, 260, 2, 99, 17]
    got = prefill_logits(model, ids)
    monkeypatch.setenv("SHARDLINE_CPU_ACTIVATIONS", "float32")
    exact = prefill_logits(packed_linear.load_packed_model(config, ParallelContext.single())[0], ids)
    error = ((got - exact).abs().max() / exact.abs().max()).item()
    assert 0 < error < 0.05, error
