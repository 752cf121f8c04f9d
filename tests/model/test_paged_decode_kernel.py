"""The fused CPU paged decode-attention kernel against the gather + SDPA path it replaces.

Random caches with shuffled (non-contiguous) block tables, context lengths of one token, exactly
a block, a block and one more, many blocks; GQA and MHA; head_dim 64 and 48; one sequence and
many; mixed prefill + decode batches through `Attention.forward`; the SDPA fallback when the
kernel is switched off or cannot be built. Tests that need the kernel build it (once per
machine, into `$SHARDLINE_HOME`) and fail, rather than skip, if a C++ compiler is there but the
build does not work.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardline.model import attention as attention_module
from shardline.model import paged_decode
from shardline.model.attention import Attention, AttentionMetadata

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kernel() -> None:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine: the kernel cannot be built")
    paged_decode.KERNEL.require()


@pytest.fixture
def kernel_mode(kernel: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(paged_decode.MODE_ENV, "kernel")


def make_case(gen: torch.Generator, seq_lens: list[int], *, heads: int, kv_heads: int,
              head_dim: int, block_size: int, spare_blocks: int = 3):
    """A layer whose random cache holds every sequence in shuffled blocks, and decode metadata.

    Every other sequence's table has one block more than it needs (tables are allocated ahead).
    """
    counts = [-(-n // block_size) + (i % 2) for i, n in enumerate(seq_lens)]
    num_blocks = sum(counts) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for count in counts:
        tables.append(order[used:used + count])
        used += count
    layer = Attention(heads, head_dim, head_dim**-0.5, kv_heads)
    layer.kv_cache = torch.randn(num_blocks, 2, block_size, kv_heads, head_dim, generator=gen)
    attn = AttentionMetadata.build(query_lens=[1] * len(seq_lens),
                                   context_lens=[n - 1 for n in seq_lens],
                                   block_tables=tables, block_size=block_size)
    query = torch.randn(len(seq_lens), heads, head_dim, generator=gen)
    return layer, attn, query


def kernel_and_sdpa(layer: Attention, attn: AttentionMetadata, query: torch.Tensor,
                    seqs: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    fused = torch.full_like(query, float("nan"))
    gathered = torch.full_like(query, float("nan"))
    layer._attend_decode(query, fused, attn, seqs)
    layer._attend_decode_sdpa(query, gathered, attn, seqs)
    return fused, gathered


SHAPES = [  # heads, kv_heads, head_dim
    pytest.param(9, 3, 64, id="gqa3-d64"),  # SmolLM2-135M
    pytest.param(4, 4, 64, id="mha-d64"),
    pytest.param(8, 2, 48, id="gqa4-d48"),
    pytest.param(5, 1, 48, id="mqa-d48"),
]
KV_DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # EngineConfig.kv_cache_dtype on CPU
LENGTHS = [
    pytest.param([1], id="one-token"),
    pytest.param([16], id="one-full-block"),
    pytest.param([17], id="block-plus-one"),
    pytest.param([300], id="many-blocks"),
    pytest.param([1, 16, 17, 32, 33, 250, 7, 64], id="mixed-lengths"),
    pytest.param([1 + 37 * i % 200 for i in range(40)], id="forty-seqs"),
]


@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), SHAPES)
def test_kernel_matches_gather_sdpa(kernel_mode, heads, kv_heads, head_dim, lengths):
    gen = torch.Generator().manual_seed(len(lengths) * 1000 + heads * 10 + head_dim)
    layer, attn, query = make_case(gen, lengths, heads=heads, kv_heads=kv_heads,
                                   head_dim=head_dim, block_size=16)
    fused, gathered = kernel_and_sdpa(layer, attn, query)
    torch.testing.assert_close(fused, gathered, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), SHAPES)
def test_kernel_reads_16bit_caches(kernel_mode, heads, kv_heads, head_dim, lengths, cache_dtype):
    """A float16/bfloat16 cache: the kernel (K/V widened to float32 as they are read) gives
    what float32 gather + SDPA gives over the same values held in a float32 cache, and the
    gather path over the 16-bit cache (converting what it gathers) gives exactly that."""
    gen = torch.Generator().manual_seed(len(lengths) * 1000 + heads * 10 + head_dim)
    layer, attn, query = make_case(gen, lengths, heads=heads, kv_heads=kv_heads,
                                   head_dim=head_dim, block_size=16)
    layer.kv_cache = layer.kv_cache.to(cache_dtype)
    widened = Attention(heads, head_dim, head_dim**-0.5, kv_heads)
    widened.kv_cache = layer.kv_cache.float()
    fused, gathered = kernel_and_sdpa(layer, attn, query)
    reference = torch.full_like(query, float("nan"))
    widened._attend_decode_sdpa(query, reference, attn, None)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gathered, reference, rtol=0, atol=0)


def test_kernel_matches_dense_softmax_with_large_scores(kernel_mode):
    """Scores far from 0 (a sharp softmax) must not overflow or lose the running max."""
    gen = torch.Generator().manual_seed(7)
    layer, attn, query = make_case(gen, [5, 40, 129], heads=4, kv_heads=2, head_dim=64,
                                   block_size=8)
    layer.kv_cache[:, 0] *= 6.0
    query *= 6.0
    fused, gathered = kernel_and_sdpa(layer, attn, query)
    torch.testing.assert_close(fused, gathered, rtol=1e-5, atol=1e-5)
    keys = layer.kv_cache[:, 0].flatten(0, 1)  # [blocks * block_size, kv_heads, D]
    values = layer.kv_cache[:, 1].flatten(0, 1)
    for i, n in enumerate(attn.seq_lens_cpu):
        slots = [attn.block_tables[i, p // 8].item() * 8 + p % 8 for p in range(n)]
        k = keys[slots].repeat_interleave(2, dim=1)  # [n, heads, D]
        v = values[slots].repeat_interleave(2, dim=1)
        scores = torch.einsum("hd,nhd->hn", query[i].double(), k.double()) / math.sqrt(64)
        want = torch.einsum("hn,nhd->hd", scores.softmax(-1), v.double())
        torch.testing.assert_close(fused[i].double(), want, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_kernel_matches_gather_sdpa_property(kernel_mode, data):
    kv_heads = data.draw(st.integers(1, 4), label="kv_heads")
    heads = kv_heads * data.draw(st.integers(1, 4), label="group")
    head_dim = data.draw(st.sampled_from([1, 7, 16, 48, 64, 80, 128]), label="head_dim")
    block_size = data.draw(st.sampled_from([1, 3, 16, 32]), label="block_size")
    lengths = data.draw(st.lists(st.integers(1, 130), min_size=1, max_size=12), label="lengths")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    cache_dtype = data.draw(st.sampled_from(KV_DTYPES), label="cache_dtype")
    layer, attn, query = make_case(torch.Generator().manual_seed(seed), lengths, heads=heads,
                                   kv_heads=kv_heads, head_dim=head_dim, block_size=block_size)
    layer.kv_cache = layer.kv_cache.to(cache_dtype)  # gather + SDPA widens what it gathers
    subset = data.draw(st.one_of(st.none(), st.lists(st.sampled_from(range(len(lengths))),
                                                     min_size=1, unique=True)), label="seqs")
    fused, gathered = kernel_and_sdpa(layer, attn, query, subset)
    rows = slice(None) if subset is None else subset
    torch.testing.assert_close(fused[rows], gathered[rows], rtol=1e-5, atol=1e-5)


def test_subset_writes_only_its_rows_and_reads_strided_queries(kernel_mode):
    gen = torch.Generator().manual_seed(3)
    layer, attn, query = make_case(gen, [20, 3, 45, 16], heads=6, kv_heads=2, head_dim=48,
                                   block_size=16)
    wide = torch.randn(4, 6 * 48 + 100, generator=gen)  # q as a slice of a fused qkv row
    wide[:, :6 * 48] = query.flatten(1)
    strided = wide[:, :6 * 48].view(4, 6, 48)
    assert not strided.is_contiguous()
    fused, gathered = kernel_and_sdpa(layer, attn, strided, [2, 0])
    torch.testing.assert_close(fused[[2, 0]], gathered[[2, 0]], rtol=1e-5, atol=1e-5)
    assert fused[[1, 3]].isnan().all()  # rows of sequences not asked for are left alone


def run_mixed_batches(layer: Attention, gen: torch.Generator) -> list[torch.Tensor]:
    """Prefill, chunked prefill and decode steps through Attention.forward; every output."""
    heads, kv_heads, dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
    tables = {"a": [7, 2, 11, 4, 20, 21], "b": [3, 9, 1, 25], "c": [15, 5, 30, 8, 12]}
    steps = [{"a": (0, 17), "b": (0, 6)},                # fresh prefills
             {"a": (17, 1), "b": (6, 2), "c": (0, 5)},   # decode + prefix chunk + prefill
             {"c": (5, 11), "b": (8, 1), "a": (18, 1)},  # decodes at a block boundary
             {"a": (19, 1), "c": (16, 1), "b": (9, 1)},  # decode only
             {"b": (10, 1)}]
    outputs = []
    for step in steps:
        names = list(step)
        attn = AttentionMetadata.build(query_lens=[step[n][1] for n in names],
                                       context_lens=[step[n][0] for n in names],
                                       block_tables=[tables[n] for n in names], block_size=4)
        tokens = attn.query_start_loc_cpu[-1]
        q = torch.randn(tokens, heads * dim, generator=gen)
        k = torch.randn(tokens, kv_heads * dim, generator=gen)
        v = torch.randn(tokens, kv_heads * dim, generator=gen)
        outputs.append(layer(q, k, v, attn))
    return outputs


@pytest.mark.parametrize("cache_dtype", KV_DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), SHAPES)
@pytest.mark.parametrize("rowwise_max", [128, 8, 0])
def test_mixed_batches_through_forward(kernel, monkeypatch, heads, kv_heads, head_dim, rowwise_max,
                                       cache_dtype):
    """Fresh prefills, prefix chunks and decodes in one step: the kernel path (prefill chunks
    of up to ROWWISE_MAX_QUERY tokens row by row, longer ones through SDPA) gives what gather +
    SDPA gives for every row."""
    monkeypatch.setattr(attention_module, "ROWWISE_MAX_QUERY", rowwise_max)
    results = {}
    calls = []
    real = paged_decode.paged_decode_attention
    monkeypatch.setattr(paged_decode, "paged_decode_attention",
                        lambda *args: calls.append((args[1].shape[0], args[5].shape[0] - 1, args[6]))
                        or real(*args))
    for mode in ("kernel", "sdpa"):
        monkeypatch.setenv(paged_decode.MODE_ENV, mode)
        layer = Attention(heads, head_dim, head_dim**-0.5, kv_heads)
        layer.kv_cache = torch.zeros(32, 2, 4, kv_heads, head_dim, dtype=cache_dtype)
        results[mode] = run_mixed_batches(layer, torch.Generator().manual_seed(11))
    # (tokens in the step, rows the kernel attended, seq_ids) per kernel call
    seq_ids = [None if c[2] is None else c[2].tolist() for c in calls]
    if rowwise_max == 128:  # every row of every step in one call
        assert [c[:2] for c in calls] == [(23, 23), (8, 8), (13, 13), (3, 3), (1, 1)]
        assert seq_ids == [None] * 5
    elif rowwise_max == 8:  # the 17- and 11-token chunks went to SDPA, the rest row by row
        assert [c[:2] for c in calls] == [(23, 6), (8, 8), (13, 2), (3, 3), (1, 1)]
    else:  # no row-wise path: the decode subsets of mixed steps, then the decode-only steps
        assert seq_ids == [[0], [1, 2], None, None]
    # With a 16-bit cache, rows the kernel attends read their own step's K/V rounded to the
    # cache, where SDPA's fresh prefill uses them as computed: their rounding apart.
    tol = 1e-5 if cache_dtype == torch.float32 else 4 * torch.finfo(cache_dtype).eps
    for fused, gathered in zip(results["kernel"], results["sdpa"], strict=True):
        torch.testing.assert_close(fused, gathered, rtol=tol, atol=tol)


def test_sdpa_mode_never_calls_the_kernel(monkeypatch):
    monkeypatch.setenv(paged_decode.MODE_ENV, "sdpa")
    monkeypatch.setattr(paged_decode, "paged_decode_attention",
                        lambda *args: pytest.fail("the kernel ran in sdpa mode"))
    unbuildable = paged_decode.KernelBuild(build_root=pathlib.Path("/nonexistent"))
    monkeypatch.setattr(paged_decode, "KERNEL", unbuildable)
    assert not paged_decode.kernel_enabled(torch.device("cpu"), torch.float32)
    layer = Attention(4, 8, 8**-0.5, 2)
    layer.kv_cache = torch.zeros(32, 2, 4, 2, 8)
    outputs = run_mixed_batches(layer, torch.Generator().manual_seed(1))
    assert all(out.isfinite().all() for out in outputs)


def test_other_dtypes_and_devices_keep_sdpa(kernel_mode):
    assert not paged_decode.kernel_enabled(torch.device("cpu"), torch.float64)
    assert not paged_decode.kernel_enabled(torch.device("cpu"), torch.float8_e4m3fn)
    assert paged_decode.kernel_enabled(torch.device("cpu"), torch.bfloat16)  # 16-bit KV caches
    assert paged_decode.kernel_enabled(torch.device("cpu"), torch.float16)
    assert not paged_decode.kernel_enabled(torch.device("cuda"), torch.float32)
    assert not paged_decode.kernel_enabled(torch.device("meta"), torch.float32)
    assert paged_decode.kernel_enabled(torch.device("cpu"), torch.float32)


def test_a_failed_build_falls_back_with_one_warning(monkeypatch, tmp_path, caplog):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    failing = paged_decode.KernelBuild(sources=(broken,), name="shardline_broken_kernel",
                                       build_root=tmp_path / "ext")
    monkeypatch.setattr(paged_decode, "KERNEL", failing)
    monkeypatch.setenv(paged_decode.MODE_ENV, "auto")
    with caplog.at_level(logging.WARNING, logger=paged_decode.__name__):
        layer = Attention(4, 8, 8**-0.5, 2)
        layer.kv_cache = torch.zeros(32, 2, 4, 2, 8)
        run_mixed_batches(layer, torch.Generator().manual_seed(2))  # 4 decode calls
        assert not paged_decode.kernel_enabled(torch.device("cpu"), torch.float32)
    warnings = [r for r in caplog.records if r.name == paged_decode.__name__]
    assert len(warnings) == 1 and "gather + SDPA" in warnings[0].getMessage()
    assert failing.error is not None
    monkeypatch.setenv(paged_decode.MODE_ENV, "kernel")
    with pytest.raises(RuntimeError, match="could not be built"):
        paged_decode.kernel_enabled(torch.device("cpu"), torch.float32)


def test_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv(paged_decode.MODE_ENV, "fast")
    with pytest.raises(ValueError, match="SHARDLINE_CPU_ATTENTION"):
        paged_decode.kernel_enabled(torch.device("cpu"), torch.float32)


def test_bad_block_tables_raise_instead_of_reading_out_of_bounds(kernel_mode):
    gen = torch.Generator().manual_seed(5)
    layer, attn, query = make_case(gen, [10, 20], heads=4, kv_heads=2, head_dim=16, block_size=4)
    out = torch.empty_like(query)
    attn.block_tables[1, 2] = layer.kv_cache.shape[0]  # one past the last block
    with pytest.raises(RuntimeError, match="out of range"):
        layer._attend_decode(query, out, attn, None)
    attn.seq_lens[0] = attn.block_tables.shape[1] * 4 + 1  # longer than its table holds
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        layer._attend_decode(query, out, attn, [0])


BUILD_SCRIPT = """
import json, sys, torch
from shardline.model import paged_decode
paged_decode.KERNEL.require()
gen = torch.Generator().manual_seed(0)
cache = torch.randn(4, 2, 4, 1, 8, generator=gen)
query = torch.randn(1, 2, 8, generator=gen)
out = torch.empty_like(query)
paged_decode.paged_decode_attention(
    out, query, cache, torch.tensor([[2, 0]], dtype=torch.int32),
    torch.tensor([6], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), None, 0.5)
print(json.dumps({"built_here": paged_decode.KERNEL.built_here, "out": out.flatten().tolist()}))
"""


@pytest.mark.slow
def test_concurrent_first_builds_compile_once(tmp_path):
    """Three processes build into an empty SHARDLINE_HOME at once, over a stale torch lock."""
    stale = paged_decode.KernelBuild(build_root=tmp_path / "torch_extensions").build_dir()
    stale.mkdir(parents=True)
    (stale / "lock").touch()  # as left by a build that was killed
    env = dict(os.environ, SHARDLINE_HOME=str(tmp_path), SHARDLINE_CPU_ATTENTION="kernel",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert sorted(r["built_here"] for r in results) == [False, False, True]
    assert results[0]["out"] == results[1]["out"] == results[2]["out"]
    assert (stale / f"{paged_decode.EXTENSION_NAME}.so").exists()
    assert not (stale / "lock").exists()


def test_a_bad_spin_setting_is_refused(monkeypatch):
    monkeypatch.setenv(paged_decode.SPIN_ENV, "lots")
    with pytest.raises(ValueError, match="SHARDLINE_CPU_SPIN_US='lots': expected a whole number"):
        paged_decode.kernel_enabled(torch.device("cpu"), torch.float32)
    monkeypatch.setenv(paged_decode.SPIN_ENV, "50")
    paged_decode.kernel_enabled(torch.device("cpu"), torch.float32)
