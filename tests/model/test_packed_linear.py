"""oneDNN-prepacked linear weights (model/packed_linear.py): same results as F.linear, packed
only where they apply, and what turns them off."""

from __future__ import annotations

import pathlib

import pytest
import torch
import torch.nn.functional as F

from model import packed_linear
from model.config import ModelConfig
from model.loader import load_model
from model.parallel import ParallelLMHead, QKVParallelLinear, RowParallelLinear
from model.parallel_context import ParallelContext
from support.tiny_models import make_tiny_model_dir

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="this torch build has no oneDNN")


@pytest.mark.parametrize("rows", [1, 4, 7, 8, 33, 64, 65, 300])
def test_packed_linear_equals_f_linear(rows):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 40, generator=gen)
    bias = torch.randn(96, generator=gen)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, packed_linear.BATCH_HINT)
    x = torch.randn(rows, 40, generator=gen)
    for b in (None, bias):
        torch.testing.assert_close(packed_linear.linear(x, weight, b, packed), F.linear(x, weight, b),
                                   rtol=1e-5, atol=1e-5)
    # A strided input (a slice of a wider tensor) and other dtypes take the right path.
    wide = torch.randn(rows, 80, generator=gen)[:, :40]
    torch.testing.assert_close(packed_linear.linear(wide, weight, None, packed), F.linear(wide, weight),
                               rtol=1e-5, atol=1e-5)
    x64 = x.double()
    assert packed_linear.linear(x64, weight.double(), None, packed).dtype == torch.float64


def test_only_decode_sized_inputs_take_the_packed_path(monkeypatch):
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    def spy(x, *args):
        calls.append(x.shape[0])
        return real(x, *args)

    weight = torch.randn(16, 8)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, packed_linear.BATCH_HINT)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    for rows in (1, 3, 4, 9, 64, 65, 2048):
        out = packed_linear.linear(torch.randn(rows, 8), weight, None, packed)
        assert out.shape == (rows, 16) and out.is_contiguous()
    bucket = packed_linear.ROW_BUCKET
    padded = [-(-rows // bucket) * bucket for rows in (4, 9, 64)]
    assert calls == padded  # 4, 9 and 64 rows (padded to the bucket); 1, 3, 65, 2048 unpacked
    assert padded[1] > 9  # 9 rows really were padded


def _tiny(tmp_path: pathlib.Path, **kw) -> torch.nn.Module:
    path = make_tiny_model_dir(tmp_path / "m", num_layers=2, hidden_size=64, intermediate_size=128,
                               tie_word_embeddings=True)
    return load_model(ModelConfig.from_path(path, **kw), ParallelContext.single())


def test_a_packed_model_computes_what_the_unpacked_one_does(tmp_path, monkeypatch):
    model = _tiny(tmp_path)
    layers = [m for m in model.modules() if hasattr(m, "packed_weight")]
    assert {type(m) for m in layers} >= {QKVParallelLinear, RowParallelLinear, ParallelLMHead}
    ids = torch.tensor([5, 17, 300, 42, 9, 260])
    from model.attention import AttentionMetadata

    attn = AttentionMetadata.build(query_lens=[6], context_lens=[0], block_tables=[[0]], block_size=16)
    with torch.inference_mode():
        want = model.compute_logits(model(ids, torch.arange(6), attn))
    added = packed_linear.pack_linear_weights(model)
    assert added == sum(m.weight.numel() * 4 for m in layers)
    assert all(m.packed_weight is not None for m in layers)
    # The tied head keeps sharing the embedding's weight; the packed copy is its own.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.inference_mode():
        got = model.compute_logits(model(ids, torch.arange(6), attn))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_what_turns_packing_off(tmp_path, monkeypatch):
    model = _tiny(tmp_path)
    monkeypatch.setenv(packed_linear.ENV, "off")
    assert packed_linear.pack_linear_weights(model) == 0
    monkeypatch.setenv(packed_linear.ENV, "sometimes")
    with pytest.raises(ValueError, match="SHARDLINE_CPU_PACKED_LINEAR='sometimes'"):
        packed_linear.pack_linear_weights(model)
    monkeypatch.delenv(packed_linear.ENV)
    monkeypatch.setattr(packed_linear, "MAX_MEMORY_FRACTION", 1e-12)  # the copy "exceeds RAM"
    assert packed_linear.pack_linear_weights(model) == 0
    assert all(m.packed_weight is None for m in model.modules() if hasattr(m, "packed_weight"))


def test_only_cpu_float32_weights_are_packed(tmp_path):
    model = _tiny(tmp_path, dtype=torch.float64)
    assert packed_linear.pack_linear_weights(model) == 0
