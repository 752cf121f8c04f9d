"""Parallel layer sharding, rotary settings and pipeline stage splits (single process)."""

from __future__ import annotations

import pytest
import torch

from shardline.model.attention import AttentionMetadata
from shardline.model.config import ModelConfig
from shardline.model.layers import RotaryEmbedding, rope_frequencies, rope_inv_freq, rope_parameters
from shardline.model.llama import LlamaForCausalLM, pp_layer_range
from shardline.model.loader import iter_weights, load_model
from shardline.model.parallel import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    divide,
)
from shardline.model.parallel_context import ParallelContext
from support.tiny_models import make_tiny_model_dir


def ctx(rank: int, size: int) -> ParallelContext:
    return ParallelContext(tp_rank=rank, tp_size=size)


def test_divide_names_the_sizes():
    assert divide(12, 4) == 3
    with pytest.raises(ValueError, match=r"num_attention_heads=9 .* tensor_parallel_size=2"):
        divide(9, 2, "num_attention_heads")


def test_qkv_shards_and_replicates_kv_heads():
    head_dim, hidden = 2, 4
    q = torch.arange(4 * head_dim * hidden, dtype=torch.float32).view(4 * head_dim, hidden)
    k = 100 + torch.arange(2 * head_dim * hidden, dtype=torch.float32).view(2 * head_dim, hidden)
    v = -k
    for size, kv_heads_local in ((2, 1), (4, 1)):
        for rank in range(size):
            layer = QKVParallelLinear(hidden, head_dim, 4, 2, False, ctx(rank, size))
            for shard, tensor in (("q", q), ("k", k), ("v", v)):
                layer.weight_loader(layer.weight, tensor, shard)
            assert layer.num_kv_heads == kv_heads_local
            q_rows = 4 // size * head_dim
            kv_head = rank * 2 // size  # which of the 2 KV heads this rank holds
            assert torch.equal(layer.weight[:q_rows], q[rank * q_rows:(rank + 1) * q_rows])
            kv_rows = slice(kv_head * head_dim, (kv_head + 1) * head_dim)
            assert torch.equal(layer.weight[q_rows:q_rows + head_dim], k[kv_rows])
            assert torch.equal(layer.weight[q_rows + head_dim:], v[kv_rows])


def test_tp_that_does_not_divide_heads_is_a_clear_error():
    with pytest.raises(ValueError, match=r"num_attention_heads=4 .* tensor_parallel_size=3"):
        QKVParallelLinear(8, 2, 4, 2, False, ctx(0, 3))
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 .* num_key_value_heads=2"):
        QKVParallelLinear(8, 2, 6, 2, False, ctx(0, 3))  # 3 ranks cannot share 2 KV heads
    path_ctx = ParallelContext(tp_rank=1, tp_size=3)
    with pytest.raises(ValueError, match="num_attention_heads=4"):
        LlamaForCausalLM(_tiny_config(), path_ctx)


_TINY: dict[str, ModelConfig] = {}


def _tiny_config() -> ModelConfig:
    import tempfile

    if "cfg" not in _TINY:
        _TINY["cfg"] = ModelConfig.from_path(make_tiny_model_dir(tempfile.mkdtemp()))
    return _TINY["cfg"]


def test_row_and_merged_column_shards():
    w = torch.arange(24, dtype=torch.float32).view(4, 6)
    row = RowParallelLinear(6, 4, False, ctx(1, 2))
    row.weight_loader(row.weight, w)
    assert torch.equal(row.weight, w[:, 3:])
    merged = MergedColumnParallelLinear(6, [4, 4], False, ctx(1, 2))
    merged.weight_loader(merged.weight, w, 0)
    merged.weight_loader(merged.weight, w + 100, 1)
    assert torch.equal(merged.weight, torch.cat([w[2:], w[2:] + 100]))


def test_vocab_shards_pad_an_uneven_vocabulary():
    table = torch.randn(10, 3)
    shards = [VocabParallelEmbedding(10, 3, ctx(r, 3)) for r in range(3)]
    for shard in shards:
        shard.weight_loader(shard.weight, table)
    assert [s.weight.shape[0] for s in shards] == [4, 4, 4]
    assert torch.equal(torch.cat([s.weight for s in shards])[:10], table)
    assert not shards[2].weight[2:].any()


def test_rope_settings_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500000.0,
                         rope_scaling=scaling, max_position_embeddings=256)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    got = rope_inv_freq(16, rope_parameters(config), 256)
    torch.testing.assert_close(got, want)
    params = rope_parameters(config)
    assert params["rope_type"] == "llama3" and params["rope_theta"] == 500000.0
    with pytest.raises(ValueError, match=r"rope_scaling.rope_type='mrope' is not supported"):
        rope_inv_freq(16, {"rope_type": "mrope", "rope_theta": 1e4}, 256)
    with pytest.raises(ValueError, match=r"rope_scaling.factor is required for rope_type='yarn'"):
        rope_inv_freq(16, {"rope_type": "yarn", "rope_theta": 1e4}, 256)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16,
     "mscale": 1.0, "mscale_all_dim": 0.5},
    {"rope_type": "longrope", "original_max_position_embeddings": 64,
     "short_factor": [1.0 + i / 10 for i in range(8)], "long_factor": [2.0 + i for i in range(8)]},
    {"rope_type": "dynamic", "factor": 2.0},
])
def test_yarn_longrope_and_dynamic_rope_match_transformers(scaling):
    """Frequencies and the cos/sin attention factor as transformers computes them: longrope's
    short factors below the pretraining length and its long ones from it on; dynamic NTK is the
    default rope within max_position_embeddings (where transformers does not rescale)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=10000.0,
                         rope_scaling=dict(scaling), max_position_embeddings=256)
    params = rope_parameters(config)
    kind = scaling["rope_type"]
    want, want_factor = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    freq, long_freq, boundary, factor = rope_frequencies(16, params, 256)
    torch.testing.assert_close(freq, want)
    assert factor == pytest.approx(want_factor)
    rotary = RotaryEmbedding(16, 256, params)
    torch.testing.assert_close(rotary.cos_cache[5, :8], torch.cos(5 * want) * want_factor)
    if kind == "longrope":
        long_want, _ = ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=65)
        torch.testing.assert_close(long_freq, long_want)
        assert boundary == 64
        torch.testing.assert_close(rotary.cos_cache[100, :8], torch.cos(100 * long_want) * want_factor)


def test_llama3_rope_model_matches_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    path = make_tiny_model_dir(tmp_path, rope_theta=500000.0, rope_scaling=scaling,
                               max_position_embeddings=128)
    model = load_model(ModelConfig.from_path(path), ParallelContext.single())
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.arange(3, 83)
    attn = AttentionMetadata.build(query_lens=[80], context_lens=[0], block_tables=[[0] * 20], block_size=4)
    with torch.no_grad():
        got = model.compute_logits(model(ids, torch.arange(80), attn))
        want = hf(ids[None]).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    rotary = RotaryEmbedding(16, 8, {"rope_type": "default", "rope_theta": 10000.0})
    q = torch.randn(3, 32)
    rq, _ = rotary(torch.tensor([0, 0, 0]), q, q[:, :16])
    assert torch.equal(rq, q)  # position 0 is the identity


def test_pipeline_stages_chain_to_the_full_model(tmp_path):
    path = make_tiny_model_dir(tmp_path, num_layers=3, tie_word_embeddings=True)
    config = ModelConfig.from_path(path)
    assert [pp_layer_range(3, r, 2) for r in range(2)] == [(0, 2), (2, 3)]
    full = load_model(config, ParallelContext.single())
    first = load_model(config, ParallelContext(pp_rank=0, pp_size=2))
    last = load_model(config, ParallelContext(pp_rank=1, pp_size=2))
    assert not hasattr(first, "lm_head") and not hasattr(last.model, "embed_tokens")
    ids = torch.tensor([5, 9, 77, 3, 100])
    attn = AttentionMetadata.build(query_lens=[5], context_lens=[0], block_tables=[[0, 1]], block_size=4)
    with torch.no_grad():
        hidden, residual = first(ids, torch.arange(5), attn)
        staged = last.compute_logits(last(ids, torch.arange(5), attn, (hidden, residual)))
        whole = full.compute_logits(full(ids, torch.arange(5), attn))
    torch.testing.assert_close(staged, whole)
    with pytest.raises(RuntimeError, match="last pipeline stage"):
        first.compute_logits(hidden)
    # The tied head on the last stage loaded the embedding's values.
    names = dict(iter_weights(config, lazy=False))
    assert torch.equal(last.lm_head.weight, names["model.embed_tokens.weight"])


def test_a_large_embedding_table_is_not_committed_before_it_is_loaded() -> None:
    """A GGUF table stays in its blocks, so the float table a constructor makes must not take
    memory: 128,256 x 2,048 float32 is 1 GiB, once a transient peak at every GGUF load."""
    import psutil

    process = psutil.Process()
    before = process.memory_info().rss
    table = VocabParallelEmbedding(128256, 2048, ParallelContext.single(), dtype=torch.float32)
    grown = process.memory_info().rss - before
    assert table.weight.shape == (128256, 2048)
    assert grown < 64 << 20, f"constructing the table committed {grown >> 20} MiB"
    # The float path still loads exact values, zeros in the padding rows of the last TP shard.
    small = VocabParallelEmbedding(9, 4, ParallelContext(tp_rank=1, tp_size=2), dtype=torch.float32)
    small.weight.data.fill_(float("nan"))  # whatever the uninitialised memory held
    loaded = torch.arange(36, dtype=torch.float32).view(9, 4)
    small.weight_loader(small.weight, loaded)
    assert torch.equal(small.weight[:4], loaded[5:])
    assert torch.equal(small.weight[4], torch.zeros(4))  # row 9 of a 9-row vocabulary: padding
