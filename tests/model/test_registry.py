"""ModelRegistry: classes, lazy strings and factories; specs for spawned workers."""

from __future__ import annotations

import pytest

from shardline.model.config import ModelConfig
from shardline.model.errors import UnknownArchitectureError
from shardline.model.llama import LlamaForCausalLM, Qwen2ForCausalLM
from shardline.model.loader import load_model
from shardline.model.parallel_context import ParallelContext
from shardline.model.registry import ModelRegistry
from support.tiny_models import make_tiny_model_dir, recording_factory


@pytest.fixture
def registry():
    saved = dict(ModelRegistry._targets)
    yield ModelRegistry
    ModelRegistry._targets.clear()
    ModelRegistry._targets.update(saved)


def test_builtin_architectures_resolve_lazily(registry):
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"} <= set(registry.known())
    assert registry.resolve("Qwen2ForCausalLM") is Qwen2ForCausalLM


def test_class_string_and_factory_targets(registry, tmp_path, monkeypatch):
    path = make_tiny_model_dir(tmp_path / "m")
    registry.register_model("MyLlama", LlamaForCausalLM)
    registry.register_model("MyLazyLlama", "shardline.model.llama:LlamaForCausalLM")
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    monkeypatch.setenv("SHARDLINE_TEST_RECORD_DIR", str(record_dir))
    registry.register_model("MyFactory", recording_factory)
    for arch in ("MyLlama", "MyLazyLlama", "MyFactory"):
        model = load_model(ModelConfig.from_path(path, architecture=arch), ParallelContext.single())
        assert isinstance(model, LlamaForCausalLM)
    assert '"tp_rank": 0, "tp_size": 1' in (record_dir / "rank-0.json").read_text()


def test_bad_targets_are_refused(registry):
    with pytest.raises(ValueError, match="module:Class"):
        registry.register_model("X", "no_colon_here")
    with pytest.raises(TypeError, match="must be a class, a factory"):
        registry.register_model("X", 42)
    registry.register_model("Broken", "shardline.model.llama:NoSuchClass")
    with pytest.raises(UnknownArchitectureError, match="cannot import 'shardline.model.llama:NoSuchClass'"):
        registry.resolve("Broken")


def test_specs_round_trip_and_refuse_unimportable_targets(registry):
    registry.register_model("Rec", recording_factory)
    specs = registry.specs()
    assert specs["Rec"] == "support.tiny_models:recording_factory"
    assert specs["LlamaForCausalLM"] == "shardline.model.llama:LlamaForCausalLM"
    registry.unregister("Rec")
    registry.register_specs(specs)
    assert registry.resolve("Rec") is recording_factory
    registry.register_model("Local", lambda cfg, ctx: None)
    with pytest.raises(ValueError, match="cannot be imported by a worker process"):
        registry.specs()
