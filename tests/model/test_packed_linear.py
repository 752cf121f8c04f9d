"""Panel-packed linear weights and the decode GEMM (model/packed_linear.py, csrc/cpu_gemm.cpp,
csrc/cpu_pool.h): same results as F.linear, packed only where they apply, and what turns them
off."""

from __future__ import annotations

import logging
import pathlib
import threading

import pytest
import torch
import torch.nn.functional as F

from shardline.model import packed_linear, paged_decode
from shardline.model.config import ModelConfig
from shardline.model.loader import load_model
from shardline.model.memory import HUGE_PAGE
from shardline.model.parallel import ParallelLMHead, QKVParallelLinear, RowParallelLinear
from shardline.model.parallel_context import ParallelContext
from support.tiny_models import gguf_round_trip, make_tiny_model_dir, quantize_linear_weights

pytestmark = pytest.mark.skipif(not paged_decode.KERNEL.load(),
                                reason="the CPU kernels do not build here")


# Rows: 1, a tile's worth (12), one more, uneven tile splits, and more than MAX_ROWS (F.linear).
# Columns: whole panels (96) and a ragged last panel (101); K odd (41) and long (600).
@pytest.mark.parametrize("rows", [1, 2, 7, 12, 13, 25, 64, 100, 256, 300])
@pytest.mark.parametrize("n,k", [(96, 40), (101, 41), (330, 600)])
def test_packed_linear_equals_f_linear(rows, n, k, two_threads):
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    weight = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    packed = packed_linear.pack_weight(weight)
    assert packed.shape == (-(-n // 32), k, 32)
    x = torch.randn(rows, k, generator=gen)
    for b in (None, bias):
        torch.testing.assert_close(packed_linear.linear(x, weight, b, packed), F.linear(x, weight, b),
                                   rtol=1e-4, atol=1e-4)
    # A strided input (a slice of a wider tensor, and one with non-unit column stride).
    wide = torch.randn(rows, 2 * k, generator=gen)
    for view in (wide[:, :k], wide[:, ::2]):
        torch.testing.assert_close(packed_linear.linear(view, weight, None, packed),
                                   F.linear(view, weight), rtol=1e-4, atol=1e-4)
    # Other dtypes take F.linear.
    x64 = x.double()
    assert packed_linear.linear(x64, weight.double(), None, packed).dtype == torch.float64


def test_only_decode_sized_inputs_take_the_packed_path(monkeypatch):
    calls = []
    real = torch.ops.shardline.packed_gemm

    def spy(out, x, *args):
        calls.append(x.shape[0])
        return real(out, x, *args)

    weight = torch.randn(16, 8)
    packed = packed_linear.pack_weight(weight)
    monkeypatch.setattr(torch.ops.shardline, "packed_gemm", spy)
    for rows in (0, 1, 3, 64, packed_linear.MAX_ROWS, packed_linear.MAX_ROWS + 1, 2048):
        out = packed_linear.linear(torch.randn(rows, 8), weight, None, packed)
        assert out.shape == (rows, 16) and out.is_contiguous()
    assert calls == [1, 3, 64, packed_linear.MAX_ROWS]


def test_bad_arguments_get_clear_errors():
    weight = torch.randn(64, 16)
    packed = packed_linear.pack_weight(weight)
    out, x = torch.empty(4, 64), torch.randn(4, 16)
    cases = [
        ((out, torch.randn(4, 17), packed, None), "packed weight has K=16, x has 17"),
        ((torch.empty(4, 65), x, packed, None), "2 panels, out has 65 columns"),
        ((torch.empty(5, 64), x, packed, None), "out has 5 rows, x has 4"),
        ((out, x, packed.transpose(0, 1), None), "packed must be a contiguous"),
        ((out, x.double(), packed, None), "x and out must be CPU float32"),
        ((out, x, packed, torch.randn(63)), "bias must be a contiguous float32 \\[64\\]"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.shardline.packed_gemm(*args)
    torch.ops.shardline.packed_gemm(out, x, packed, None)  # and it still works
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-4, atol=1e-4)


def test_concurrent_callers_share_the_pool_safely(two_threads):
    """Callers on several threads at once (the pool serves one; the others run alone) all get
    their own right answers, many times over: no lost chunk, no cross-talk, no hang."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(32 * (i + 3), 64, generator=gen) for i in range(4)]
    packs = [packed_linear.pack_weight(w) for w in weights]
    inputs = [torch.randn(16, 64, generator=gen) for _ in weights]
    wants = [F.linear(x, w) for x, w in zip(inputs, weights, strict=True)]
    errors: list[BaseException] = []

    def caller(i: int) -> None:
        try:
            for _ in range(300):
                got = packed_linear.linear(inputs[i], weights[i], None, packs[i])
                torch.testing.assert_close(got, wants[i], rtol=1e-4, atol=1e-4)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert not errors, errors[0]


# K: one block (32), a slice and a half (192: slices of 128 and 64), SmolLM2's (576); N ragged.
@pytest.mark.parametrize("qtype", ["Q4_1", "Q4_0", "Q8_0"])
@pytest.mark.parametrize("n,k", [(40, 32), (101, 192), (96, 576)])
def test_integer_blocks_compute_what_float32_panels_do_bit_for_bit(qtype, n, k, two_threads):
    gen = torch.Generator().manual_seed(n + k)
    weight = gguf_round_trip(torch.randn(n, k, generator=gen) * 0.05, qtype)
    blocks = packed_linear.integer_blocks(weight)
    assert blocks is not None
    d, m, q = blocks
    assert d.shape == m.shape == (n, k // 32) and q.shape == (n, k) and q.dtype == torch.int8
    rebuilt = d.repeat_interleave(32, 1) * q.float() + m.repeat_interleave(32, 1)
    assert torch.equal(rebuilt.view(torch.int32), weight.view(torch.int32))  # -0.0 included
    packed = packed_linear.pack_blocks(blocks)
    # Q4_1's q 0..15 as unsigned nibbles, Q4_0's -8..7 as signed ones, Q8_0's as int8.
    dtype, nbytes = {"Q4_1": (torch.uint8, 640), "Q4_0": (torch.int8, 640), "Q8_0": (torch.uint8, 1152)}[qtype]
    assert packed.dtype == dtype and packed.shape == (-(-n // 32), k // 32, nbytes)
    assert packed.numel() == packed_linear.blocks_nbytes(blocks)
    floats = packed_linear.pack_weight(weight)
    bias = torch.randn(n, generator=gen)
    for rows in (1, 2, 5, 8, 9, 16, 17, 64, 200):  # 1-16: direct tiles (one, then two); 17 on: slices
        x = torch.randn(rows, k, generator=gen)
        for b in (None, bias):
            got = packed_linear.linear(x, weight, b, packed)
            assert torch.equal(got, packed_linear.linear(x, weight, b, floats))
            torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-4, atol=1e-4)
    strided = torch.randn(3, 2 * k, generator=gen)[:, ::2]
    assert torch.equal(packed_linear.linear(strided, weight, None, packed),
                       packed_linear.linear(strided, weight, None, floats))


@pytest.mark.parametrize("q_range,layout", [((0, 15), (torch.uint8, 640)), ((0, 7), (torch.uint8, 640)),
                                             ((-8, 7), (torch.int8, 640)), ((-8, 8), (torch.uint8, 1152)),
                                             ((-1, 15), (torch.uint8, 1152)), ((-127, 127), (torch.uint8, 1152))])
def test_block_layouts_follow_the_range_of_q(q_range, layout, two_threads):
    """Every q of a weight decides its layout: nibbles when they all fit 0..15 or -8..7 (the
    extremes included), int8 otherwise; each computes what the float32 panels of d * q + m do."""
    gen = torch.Generator().manual_seed(q_range[1])
    n, k = 70, 192
    d = (torch.rand(n, k // 32, generator=gen) * 0.01 + 1e-3).half().float()
    m = torch.where(torch.rand(n, k // 32, generator=gen) < 0.5, -0.0, -(d * 8)).half().float()
    q = torch.randint(q_range[0], q_range[1] + 1, (n, k), generator=gen, dtype=torch.int8)
    q[0, :2] = torch.tensor(q_range, dtype=torch.int8)  # both extremes present
    weight = d.repeat_interleave(32, 1) * q.float() + m.repeat_interleave(32, 1)
    packed = packed_linear.pack_blocks((d, m, q))
    assert packed_linear.block_layout((d, m, q)) == layout
    assert (packed.dtype, packed.shape[2]) == layout and packed.numel() == packed_linear.blocks_nbytes((d, m, q))
    out = torch.empty(packed.numel(), dtype=torch.uint8)
    assert torch.equal(packed_linear.pack_blocks((d, m, q), out).view(torch.uint8), packed.view(torch.uint8))
    floats = packed_linear.pack_weight(weight)
    for rows in (1, 3, 8, 13, 64):
        x = torch.randn(rows, k, generator=gen)
        assert torch.equal(packed_linear.linear(x, weight, None, packed),
                           packed_linear.linear(x, weight, None, floats))


def test_weights_not_of_block_form_are_left_as_float32():
    gen = torch.Generator().manual_seed(1)
    assert packed_linear.integer_blocks(torch.randn(64, 64, generator=gen)) is None
    quantized = gguf_round_trip(torch.randn(64, 96, generator=gen))
    assert packed_linear.integer_blocks(quantized) is not None
    assert packed_linear.integer_blocks(quantized[:, :80]) is None  # K not a multiple of 32
    assert packed_linear.integer_blocks(quantized.double()) is None
    nudged = quantized.clone()
    nudged[17, 40] = torch.nextafter(nudged[17, 40], torch.tensor(1.0))  # one value off by an ulp
    assert packed_linear.integer_blocks(nudged) is None
    signed_zero = quantized.clone()
    signed_zero[3, :32] = 0.0
    signed_zero[3, 5] = -0.0  # a -0.0 among +0.0: no d * q + m gives both
    assert packed_linear.integer_blocks(signed_zero) is None
    broken = quantized.clone()
    broken[0, 0] = float("nan")
    assert packed_linear.integer_blocks(broken) is None


def test_bad_integer_panels_get_clear_errors():
    weight = gguf_round_trip(torch.randn(64, 64))
    packed = packed_linear.pack_blocks(packed_linear.integer_blocks(weight))
    int8_q = packed_linear.pack_blocks(packed_linear.integer_blocks(gguf_round_trip(torch.randn(64, 64), "Q8_0")))
    out, x = torch.empty(4, 64), torch.randn(4, 64)
    cases = [
        ((out, torch.randn(4, 96), packed, None), "packed weight has K=64, x has 96"),
        ((torch.empty(4, 65), x, packed, None), "2 panels, out has 65 columns"),
        ((out, x, packed[:, :, :600].contiguous(), None), "uint8 with 1152 or 640 bytes, int8 with 640"),
        ((out, x, int8_q.view(torch.int8), None), "packed must be a contiguous"),
        ((out, x, packed.view(torch.int16), None), "packed must be a contiguous"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.shardline.packed_gemm(*args)
    torch.ops.shardline.packed_gemm(out, x, packed, None)  # and it still works
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-4, atol=1e-4)


def test_a_model_with_gguf_weights_packs_them_as_integer_blocks(tmp_path, monkeypatch):
    model = _tiny(tmp_path)
    assert quantize_linear_weights(model) > 0
    layers = [m for m in model.modules() if hasattr(m, "packed_weight")]
    ids = torch.tensor([5, 17, 300, 42, 9, 260])
    from shardline.model.attention import AttentionMetadata

    attn = AttentionMetadata.build(query_lens=[6], context_lens=[0], block_tables=[[0]], block_size=16)

    def logits() -> torch.Tensor:
        with torch.inference_mode():
            return model.compute_logits(model(ids, torch.arange(6), attn))

    monkeypatch.setenv(packed_linear.ENV, "float32")
    assert packed_linear.pack_linear_weights(model) == sum(packed_linear.packed_numel(m.weight) * 4
                                                           for m in layers)
    assert all(m.packed_weight.dtype == torch.float32 for m in layers)
    want = logits()
    monkeypatch.delenv(packed_linear.ENV)  # auto
    added = packed_linear.pack_linear_weights(model)
    assert added == sum(packed_linear.blocks_nbytes(packed_linear.integer_blocks(m.weight)) for m in layers)
    assert all(m.packed_weight.dtype in (torch.uint8, torch.int8) for m in layers)
    assert len({m.packed_weight.untyped_storage().data_ptr() for m in layers}) == 1
    assert torch.equal(logits(), want)


def _tiny(tmp_path: pathlib.Path, **kw) -> torch.nn.Module:
    path = make_tiny_model_dir(tmp_path / "m", num_layers=2, hidden_size=64, intermediate_size=128,
                               tie_word_embeddings=True)
    return load_model(ModelConfig.from_path(path, **kw), ParallelContext.single())


def test_a_packed_model_computes_what_the_unpacked_one_does(tmp_path, monkeypatch):
    model = _tiny(tmp_path)
    layers = [m for m in model.modules() if hasattr(m, "packed_weight")]
    assert {type(m) for m in layers} >= {QKVParallelLinear, RowParallelLinear, ParallelLMHead}
    ids = torch.tensor([5, 17, 300, 42, 9, 260])
    from shardline.model.attention import AttentionMetadata

    attn = AttentionMetadata.build(query_lens=[6], context_lens=[0], block_tables=[[0]], block_size=16)
    with torch.inference_mode():
        want = model.compute_logits(model(ids, torch.arange(6), attn))
    added = packed_linear.pack_linear_weights(model)
    assert added == sum(m.packed_weight.numel() * 4 for m in layers)
    assert all(m.packed_weight is not None for m in layers)
    # One 2 MiB-aligned allocation holds them all (asked of Linux in huge pages).
    assert len({m.packed_weight.untyped_storage().data_ptr() for m in layers}) == 1
    assert layers[0].packed_weight.data_ptr() % HUGE_PAGE == 0
    for m in layers:
        torch.testing.assert_close(m.packed_weight, packed_linear.pack_weight(m.weight), rtol=0, atol=0)
    # The tied head keeps sharing the embedding's weight; the packed copy is its own.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.inference_mode():
        got = model.compute_logits(model(ids, torch.arange(6), attn))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_what_turns_packing_off(tmp_path, monkeypatch, caplog):
    model = _tiny(tmp_path)
    monkeypatch.setenv(packed_linear.ENV, "off")
    assert packed_linear.pack_linear_weights(model) == 0
    monkeypatch.setenv(packed_linear.ENV, "sometimes")
    with pytest.raises(ValueError, match="SHARDLINE_CPU_PACKED_LINEAR='sometimes'"):
        packed_linear.pack_linear_weights(model)
    monkeypatch.delenv(packed_linear.ENV)
    monkeypatch.setattr(packed_linear, "MAX_MEMORY_FRACTION", 1e-12)  # the copy "exceeds RAM"
    with caplog.at_level(logging.INFO, logger=packed_linear.logger.name):
        assert packed_linear.pack_linear_weights(model) == 0
    assert "the copy (over 0 MiB) would exceed 0% of RAM" in caplog.text  # stopped at the first
    monkeypatch.undo()
    monkeypatch.setattr(paged_decode.KERNEL, "load", lambda: False)  # no compiler here
    assert packed_linear.pack_linear_weights(model) == 0
    assert all(m.packed_weight is None for m in model.modules() if hasattr(m, "packed_weight"))


def test_only_cpu_float32_weights_are_packed(tmp_path):
    model = _tiny(tmp_path, dtype=torch.float64)
    assert packed_linear.pack_linear_weights(model) == 0
