"""GGUF weights run in their file form (model/gguf_weights.py, csrc/gguf_gemm.cpp).

For every type there is a kernel for: the kernel's values equal gguf-py's `dequantize` bit for
bit, its GEMM equals dequantize + torch.mm within float32 rounding for 1-256 rows, a tiny
random Llama GGUF of that type gives transformers' logits (loading the same file) and greedy
tokens, without a float32 copy of its weights; TP=2 equals TP=1, and the errors name what they
refuse.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shardline.model import paged_decode
from shardline.model.config import ModelConfig
from shardline.model.errors import CheckpointError
from shardline.model.gguf_weights import TYPES, GGUFLinearWeight, GGUFTensor
from shardline.model.loader import load_model
from shardline.model.parallel.utils import ShardShapeError
from shardline.model.parallel_context import ParallelContext
from support.gguf_models import (
    ALL_TYPES,
    gguf_py_values,
    greedy_pair,
    prefill_logits,
    quantized_bytes,
    write_tiny_llama_gguf,
)

pytestmark = pytest.mark.skipif(
    not paged_decode.KERNEL.load(), reason="the CPU kernels do not build here"
)


def random_tensor(type_name: str, rows: int, cols: int, seed: int = 0) -> GGUFTensor:
    rng = np.random.default_rng(seed)
    data = quantized_bytes(rng.normal(0, 0.05, size=(rows, cols)), type_name, rng)
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(rows, -1)
    return GGUFTensor("w", TYPES[type_name][0], (rows, cols), torch.from_numpy(raw))


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_kernel_values_are_gguf_py_dequantize_bit_for_bit(type_name):
    t = random_tensor(type_name, 40, 512)
    want = gguf_py_values(t)
    got = t.materialize()
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    ids = torch.tensor([3, 0, 39, 3])
    from shardline.model.gguf_weights import embedding

    assert torch.equal(embedding(ids, t).view(torch.int32), want[ids].view(torch.int32))


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_gemm_equals_dequantize_and_mm_for_1_to_256_rows(type_name):
    t = random_tensor(type_name, 70, 512, seed=1)  # 70 rows: groups of 16 and 4 with a tail
    dense = gguf_py_values(t).double()
    bias = torch.randn(70)
    weight = GGUFLinearWeight(70, 512, [(0, t)])
    for rows in (1, 2, 3, 5, 16, 63, 256):
        x = torch.randn(rows, 512)
        want = x.double() @ dense.T + bias.double()
        got = weight.matmul(x, bias)
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert err < 1e-5, (rows, err)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "F16"])
def test_gemm_rows_equal_one_row_gemms_bit_for_bit(type_name):
    """Each row of a many-row GEMM is that row's one-row GEMM, bit for bit: the register tiles
    of several x rows (and their sums of lanes, taken 16 at a time) add the same products in
    the same order as the one-row tile. 37 weight rows end in a part group and a part tile; K is
    one kernel block, then three; 5, 7, 67 x rows end in part tiles."""
    block = max(32, TYPES[type_name][1])
    for cols in (block, 3 * block):
        t = random_tensor(type_name, 37, cols, seed=4)
        weight = GGUFLinearWeight(37, cols, [(0, t)])
        dense = gguf_py_values(t).double()
        bias = torch.randn(37)
        for rows in (2, 4, 5, 7, 64, 67):
            x = torch.randn(rows, cols)
            got = weight.matmul(x, bias)
            alone = torch.cat([weight.matmul(x[i : i + 1], bias) for i in range(rows)])
            assert torch.equal(got.view(torch.int32), alone.view(torch.int32)), (cols, rows)
            want = x.double() @ dense.T + bias.double()
            assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5


def test_parts_write_their_rows_and_column_shards_take_whole_blocks():
    q, k = random_tensor("Q4_K", 32, 512, seed=2), random_tensor("Q6_K", 16, 512, seed=3)
    fused = GGUFLinearWeight(48, 512, [(0, q), (32, k)])
    x = torch.randn(5, 512)
    want = x.double() @ torch.cat([gguf_py_values(q), gguf_py_values(k)]).double().T
    assert ((fused.matmul(x, None).double() - want).abs().max() / want.abs().max()) < 1e-5
    # A row-parallel shard: rank 1 of 2 takes the second 256 columns, a view of the same bytes.
    shard = q.narrow(1, 256, 256)
    assert shard.data.data_ptr() == q.data.data_ptr() + 144
    assert torch.equal(shard.materialize(), gguf_py_values(q)[:, 256:])
    with pytest.raises(
        ShardShapeError, match=r"Q4_K with blocks of 256.*512 columns.*shards of 128"
    ):
        q.narrow(1, 128, 128)


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_tiny_llama_gguf_equals_transformers_on_the_same_file(type_name, tmp_path):
    from transformers import AutoModelForCausalLM

    path = write_tiny_llama_gguf(
        tmp_path / "m.gguf", type_name, seed=4, tied=type_name in ("Q4_K", "Q8_0")
    )
    model = load_model(ModelConfig.from_path(str(path)), ParallelContext.single())
    layer = model.model.layers[0]
    # The weights stayed in the file's blocks: no float32 copy of any linear weight or the table.
    assert isinstance(layer.self_attn.qkv_proj.packed_weight, GGUFLinearWeight)
    assert isinstance(model.lm_head.packed_weight, GGUFLinearWeight)
    assert all(p.is_meta for p in model.parameters() if p.dim() == 2)
    ref = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    )
    ids = [1, 45, 300 % 288, 7, 260, 2, 99, 17]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    got = prefill_logits(model, ids)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-4, err
    # Greedy tokens: four steps, each the full sequence again.
    seq, seq_ref = greedy_pair(ref, model, ids)
    assert seq == seq_ref


def test_type_without_a_kernel_is_refused_naming_it_and_the_supported_types(tmp_path):
    import gguf

    path = write_tiny_llama_gguf(tmp_path / "m.gguf", "Q8_0", seed=5)
    # Relabel one tensor's type in its header entry as TQ2_0 (no kernel): name, dims, type.
    data = bytearray(path.read_bytes())
    name = b"blk.1.ffn_up.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    data[type_at : type_at + 4] = int(gguf.GGMLQuantizationType.TQ2_0).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=r"'blk\.1\.ffn_up\.weight' is TQ2_0.*supported types: .*Q4_K"
    ):
        load_model(ModelConfig.from_path(str(path)), ParallelContext.single())


def test_tp2_equals_tp1_and_an_unsplittable_tp_size_is_refused(tmp_path, run_tp, worker_module):
    path = write_tiny_llama_gguf(
        tmp_path / "m.gguf",
        "Q4_K",
        seed=6,
        shape={"hidden": 512, "intermediate": 1024, "heads": 8, "kv_heads": 2},
    )
    config = ModelConfig.from_path(str(path))
    single = worker_module.run_scenario(
        load_model(config, ParallelContext.single()), config.hf_config.vocab_size
    )
    results = run_tp(2, [{"name": "q4k", "path": str(path)}])
    for rank in (0, 1):
        got = results[("q4k", rank)]["logits"]
        for name, want in single.items():
            err = ((got[name] - want).abs().max() / want.abs().max()).item()
            assert err < 1e-5, (rank, name, err)
    small = write_tiny_llama_gguf(tmp_path / "s.gguf", "Q4_K", seed=7)  # o_proj: 256 columns
    with pytest.raises(
        Exception,
        match=r"256 columns cannot be split into shards of 128 \(tensor_parallel_size=2\)",
    ):
        run_tp(2, [{"name": "small", "path": str(small)}])
