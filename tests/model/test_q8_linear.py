"""The int8-activation GEMM (csrc/q8_gemm.cpp, model/q8_linear.py) against its definition:
activations quantized per block of 32 (scale amax / 127, round half to even), exact integer dot
products with the weight's q, float scales per block. For every storage the packer picks (q in
0..15 or -8..7 as nibbles, wider q as bytes), 1 to 70 rows (every tile size), output widths that
are not a multiple of the 16-column groups, with and without bias. test_portable_builds runs
these against the AVX2 and baseline x86-64 builds too."""

from __future__ import annotations

import math
import pathlib

import pytest
import torch

from shardline.model import paged_decode
from shardline.model.q8_linear import Q8Weight

pytestmark = pytest.mark.skipif(not paged_decode.KERNEL.load(), reason="the CPU kernels do not build here")


def reference(x: torch.Tensor, d: torch.Tensor, m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The definition in float32 where the kernel rounds (the scale, x * 127 / amax), exact
    integers for the dot products, float64 for the rest."""
    rows, k = x.shape
    blocks = x.view(rows, k // 32, 32)
    amax = blocks.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))  # float32, as the kernel
    xq = torch.round(blocks * inv.unsqueeze(-1)).long()  # half to even, as nearbyint
    scale = (amax / 127.0).double()
    qb = q.view(q.shape[0], k // 32, 32).long()
    dots = torch.einsum("rbi,nbi->rnb", xq, qb).double()
    sums = xq.sum(-1).double()
    per_block = d.double().unsqueeze(0) * dots + m.double().unsqueeze(0) * sums.unsqueeze(1)
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
    half = bool(int(weight.packed[8:16].view(torch.int64)) & 4)  # the header's kind
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


async def test_tensor_parallel_shards_take_the_int8_kernel_too(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TP=2 over a Q4_1 GGUF in int8 mode: each rank's shard (whole blocks of 32 inputs, so the
    same activation blocks) takes the int8 kernel; the prompt NLL is TP=1's up to the float
    order of the all-reduce, and the greedy tokens are equal."""
    from support.gguf_models import write_tiny_llama_gguf

    path = str(write_tiny_llama_gguf(tmp_path / "tiny.gguf", "Q4_1", seed=4))
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
