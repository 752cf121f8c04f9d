"""Checkpoint loading: single and sharded safetensors, and every error naming its problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from shardline.model.attention import AttentionMetadata
from shardline.model.config import ModelConfig
from shardline.model.errors import CheckpointError, ModelInterfaceError, UnknownArchitectureError
from shardline.model.loader import LoadStats, load_model
from shardline.model.parallel_context import ParallelContext
from shardline.model.registry import ModelRegistry
from support.tiny_models import make_tiny_model_dir


def logits_of(model) -> torch.Tensor:
    attn = AttentionMetadata.build(query_lens=[6], context_lens=[0], block_tables=[[0, 1]], block_size=4)
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor([1, 50, 7, 300, 2, 9]), torch.arange(6), attn))


def load(path, **kwargs):
    return load_model(ModelConfig.from_path(path, **kwargs), ParallelContext.single())


def rewrite(path, edit) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


@pytest.fixture
def tiny(tmp_path):
    return make_tiny_model_dir(tmp_path / "tiny")


def test_sharded_checkpoint_with_index_equals_single_file(tmp_path):
    single = make_tiny_model_dir(tmp_path / "one", seed=5)
    sharded = make_tiny_model_dir(tmp_path / "three", seed=5, shards=3)
    assert len(list(sharded.glob("*.safetensors"))) == 3
    stats = LoadStats()
    model = load_model(ModelConfig.from_path(sharded), ParallelContext.single(), stats)
    assert stats.num_tensors == len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"])
    assert torch.equal(logits_of(model), logits_of(load(single)))
    assert not model.training and next(model.parameters()).dtype == torch.float32


def test_bfloat16_checkpoint_loads_into_float32(tiny):
    rewrite(tiny, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    model = load(tiny)
    assert next(model.parameters()).dtype == torch.float32
    assert torch.isfinite(logits_of(model)).all()


def test_unknown_architecture_lists_the_known_ones(tiny):
    with pytest.raises(UnknownArchitectureError, match=r"'GPTNeoXForCausalLM'.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        load(tiny, architecture="GPTNeoXForCausalLM")


def test_missing_tensor_is_named(tiny):
    rewrite(tiny, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*'model\.layers\.1\.self_attn\.k_proj\.weight'"):
        load(tiny)


def test_wrong_shape_is_named(tiny):
    rewrite(tiny, lambda t: t.update({"model.layers.0.mlp.down_proj.weight": torch.zeros(64, 100)}))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight'.*expected shape \[64, 128\], got \[64, 100\]"):
        load(tiny)
    make_tiny_model_dir(tiny)
    rewrite(tiny, lambda t: t.update({"model.norm.weight": torch.zeros(65)}))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight'.*expected shape \[64\], got \[65\]"):
        load(tiny)


def test_unexpected_tensor_is_named(tiny):
    rewrite(tiny, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"):
        load(tiny)


@pytest.mark.parametrize("damage", ["truncate", "garbage-header"])
def test_corrupt_safetensors_is_named(tiny, damage):
    path = tiny / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 8 + data[8:])
    with pytest.raises(CheckpointError, match=r"corrupt safetensors file .*model\.safetensors"):
        load(tiny)


def test_index_naming_a_missing_shard(tmp_path):
    path = make_tiny_model_dir(tmp_path / "m", shards=2)
    next(path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing shard file"):
        load(path)


def _gguf_copy(smollm2_dir, tmp_path):
    src = next(smollm2_dir.glob("*.gguf"))
    dst = tmp_path / src.name
    dst.write_bytes(src.read_bytes())
    return dst


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_gguf_is_named(smollm2_dir, tmp_path, damage):
    gguf = _gguf_copy(smollm2_dir, tmp_path)
    data = gguf.read_bytes()
    gguf.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"GGUF" + b"\x07" * 4096)
    with pytest.raises(CheckpointError, match=r"corrupt GGUF (file|tensor).*\.gguf"):
        load_model(ModelConfig.from_path(gguf), ParallelContext.single())


def test_model_without_the_interface_is_refused(tiny):
    class NoLogits(torch.nn.Module):
        def __init__(self, model_config, parallel_context):
            super().__init__()

        def load_weights(self, weights):
            pass

    ModelRegistry.register_model("NoLogitsForCausalLM", NoLogits)
    try:
        with pytest.raises(ModelInterfaceError, match="missing compute_logits"):
            load(tiny, architecture="NoLogitsForCausalLM")
    finally:
        ModelRegistry.unregister("NoLogitsForCausalLM")


def test_config_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ModelConfig.from_path(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_path(tmp_path)
    path = make_tiny_model_dir(tmp_path / "m")
    with pytest.raises(ValueError, match="max_model_len=4096 .* limit 2048"):
        ModelConfig.from_path(path, max_model_len=4096)
    assert ModelConfig.from_path(path, max_model_len=128, dtype="bfloat16").dtype == torch.bfloat16
