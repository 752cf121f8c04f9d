"""The fused CPU element-wise ops (model/cpu_ops.py) against the torch expressions they replace.

Each op runs on decode-sized inputs (one thread) and prefill-sized ones (split over threads),
on strided row views like the q/k/v slices of a fused projection, and rejects what it cannot
handle with a clear error. The layers switch between the two paths with SHARDLINE_CPU_FUSED_OPS.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from shardline.model import cpu_ops, paged_decode
from shardline.model.attention import Attention, AttentionMetadata
from shardline.model.layers import RMSNorm, RotaryEmbedding, SiluAndMul

ROWS = (1, 7, 64, 1500)  # 1500 x 576 elements: several thread tasks


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine: the extension cannot be built")
    paged_decode.KERNEL.require()


def both(monkeypatch: pytest.MonkeyPatch, fn):
    """`fn()` with the torch expressions, then with the fused ops."""
    monkeypatch.setenv(cpu_ops.ENV, "off")
    reference = fn()
    monkeypatch.setenv(cpu_ops.ENV, "auto")
    return reference, fn()


@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm_with_and_without_residual(monkeypatch, rows):
    gen = torch.Generator().manual_seed(rows)
    norm = RMSNorm(576, 1e-5)
    norm.weight.data = torch.randn(576, generator=gen)
    x = torch.randn(rows, 576, generator=gen) * 3
    residual = torch.randn(rows, 576, generator=gen)

    ref, fused = both(monkeypatch, lambda: norm(x.clone()))
    torch.testing.assert_close(fused, ref, rtol=2e-6, atol=2e-6)

    def with_residual():
        out, res = norm(x.clone(), residual.clone())
        return out.clone(), res.clone()

    (ref_out, ref_res), (out, res) = both(monkeypatch, with_residual)
    torch.testing.assert_close(res, ref_res, rtol=0, atol=0)  # one float add: exact
    torch.testing.assert_close(out, ref_out, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("rows", ROWS)
def test_rotary_on_the_slices_of_a_fused_qkv(monkeypatch, rows):
    gen = torch.Generator().manual_seed(rows)
    rotary = RotaryEmbedding(64, 4096, {"rope_type": "default", "rope_theta": 100000.0})
    qkv = torch.randn(rows, 9 * 64 + 2 * 3 * 64, generator=gen)
    positions = torch.randint(0, 4096, (rows,), generator=gen)

    def rotate():
        q, k, v = qkv.clone().split([576, 192, 192], dim=-1)  # strided views, as in the model
        q, k = rotary(positions, q, k)
        return q.clone(), k.clone(), v.clone()

    ref, fused = both(monkeypatch, rotate)
    for got, want in zip(fused, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", ROWS)
def test_silu_and_mul(monkeypatch, rows):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 2 * 1536, generator=gen) * 8  # reaches both tails of the sigmoid
    x[0, :4] = torch.tensor([-200.0, -87.5, 88.5, 200.0])
    ref, fused = both(monkeypatch, lambda: SiluAndMul()(x))
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", (1, 5, 700))
def test_store_kv_writes_the_slots_index_copy_writes(monkeypatch, rows, cache_dtype):
    """Into a float32 cache the rows as they are; into a 16-bit one (kv_cache_dtype) rounded to
    nearest even, bit for bit what `.to(dtype)` + index_copy_ write, ties, overflow to
    infinity and subnormals included."""
    gen = torch.Generator().manual_seed(rows)
    layer = Attention(9, 64, 0.125, 3)
    blocks = -(-rows // 16) + 4
    slots = torch.randperm(blocks * 16, generator=gen)[:rows]
    attn = AttentionMetadata.build(query_lens=[1] * rows, context_lens=[0] * rows,
                                   block_tables=[[0]] * rows, block_size=16)
    attn.slot_mapping = slots
    qkv = torch.randn(rows, 960, generator=gen)
    qkv[:, 576:600] = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8,  # ties
                                    70000.0, -70000.0, 3e38, 1e-6, -3e-8, 1e-40, 0.0, -0.0] * 2)
    _, k, v = qkv.split([576, 192, 192], dim=-1)
    start = torch.randn(blocks, 2, 16, 3, 64, generator=gen).to(cache_dtype)

    def store():
        layer.kv_cache = start.clone()
        layer._store_kv(k.view(rows, 3, 64), v.view(rows, 3, 64), attn)
        return layer.kv_cache

    ref, fused = both(monkeypatch, store)
    torch.testing.assert_close(fused, ref, rtol=0, atol=0)


def _argmax_cases() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    cases = [torch.randn(rows, 49152, generator=gen) for rows in (1, 64)]  # vocabulary-sized
    for n in range(1, 41):  # every tail length around the 16-wide vectors
        x = torch.randn(6, n, generator=gen).round()  # rounded: many ties
        x[1] = -float("inf")  # all -inf: index 0
        x[2] = 1.0  # all tied: index 0
        x[3, n // 2] = float("nan")  # one NaN wins over everything
        x[4, n - 1] = float("nan")
        x[4, 0] = float("inf")
        if n > 1:
            x[5, : n - 1] = -0.0  # -0.0 and 0.0 are equal: the first one
            x[5, n - 1] = 0.0
        cases.append(x)
    wide = torch.randn(8, 3000, generator=gen)
    wide[:, 1000] = 50.0
    wide[:, 2999] = 50.0  # a later equal maximum does not win
    wide[3, 2500] = float("nan")
    cases.append(wide)
    cases.append(torch.randn(5, 200, generator=gen)[:, 7:150])  # strided rows (a sliced vocab)
    return cases


def test_argmax_rows_matches_torch_argmax():
    for x in _argmax_cases():
        expected = x.argmax(dim=-1)
        assert torch.equal(cpu_ops.argmax_rows(x), expected), x


def test_the_greedy_sampler_uses_it(monkeypatch):
    from shardline.worker.sampler import greedy_tokens

    calls = []
    monkeypatch.setattr(cpu_ops, "argmax_rows", lambda x: calls.append(x) or x.argmax(dim=-1))
    logits = torch.randn(4, 100)
    assert torch.equal(greedy_tokens(logits), logits.argmax(dim=-1)) and len(calls) == 1
    monkeypatch.setenv(cpu_ops.ENV, "off")
    assert torch.equal(greedy_tokens(logits), logits.argmax(dim=-1)) and len(calls) == 1


def test_the_thread_pool_runs_every_item_exactly_once():
    """csrc/cpu_pool.h: per-thread regions claimed in order, then stolen; no item twice or never."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n in (*range(1, 40), 64, 97, 1000, 4099):
            for grain in (1, 3, 64):
                for _ in range(3):
                    counts = torch.zeros(n, dtype=torch.long)
                    torch.ops.shardline.pool_claims(counts, grain)
                    assert torch.equal(counts, torch.ones(n, dtype=torch.long)), (n, grain, counts)
    finally:
        torch.set_num_threads(threads)


def test_bad_inputs_get_clear_errors():
    with pytest.raises(RuntimeError, match="rms_norm: x must be a CPU float32"):
        cpu_ops.rms_norm(torch.ones(2, 8, dtype=torch.float64), torch.ones(8), 1e-5)
    with pytest.raises(RuntimeError, match="weight must be a contiguous float32"):
        cpu_ops.rms_norm(torch.ones(2, 8), torch.ones(7), 1e-5)
    table = torch.ones(16, 64)
    with pytest.raises(RuntimeError, match="position 16 is outside the table of 16"):
        cpu_ops.rotary_embedding(torch.tensor([16]), torch.ones(1, 64), torch.ones(1, 64), table, table)
    with pytest.raises(RuntimeError, match="store_kv: slot 64 is outside the cache's 64"):
        cpu_ops.store_kv(torch.ones(1, 8), torch.ones(1, 8), torch.zeros(4, 2, 16, 2, 4),
                         torch.tensor([64]))
    with pytest.raises(RuntimeError, match=r"silu_and_mul: x must be \[rows, 2d\]"):
        torch.ops.shardline.silu_and_mul(torch.empty(2, 4), torch.ones(2, 6))
    with pytest.raises(RuntimeError, match="argmax_rows: x must have at least one column"):
        cpu_ops.argmax_rows(torch.ones(2, 0))
    with pytest.raises(RuntimeError, match="argmax_rows: out must be a contiguous CPU int64"):
        torch.ops.shardline.argmax_rows(torch.empty(3, dtype=torch.long), torch.ones(2, 5))


def test_the_switch(monkeypatch):
    x = torch.ones(2, 8)
    monkeypatch.setenv(cpu_ops.ENV, "off")
    assert not cpu_ops.enabled(x)
    monkeypatch.setenv(cpu_ops.ENV, "auto")
    assert cpu_ops.enabled(x)
    assert not cpu_ops.enabled(x.double())
    assert not cpu_ops.enabled(x.to("meta"))
    monkeypatch.setenv(cpu_ops.ENV, "fast")
    with pytest.raises(ValueError, match="SHARDLINE_CPU_FUSED_OPS='fast'"):
        cpu_ops.enabled(x)
