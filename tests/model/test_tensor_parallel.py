"""TP=N in N spawned gloo processes gives the logits of TP=1 (and of transformers)."""

from __future__ import annotations

import pathlib

import pytest
import torch

from shardline.model.config import ModelConfig
from shardline.model.loader import LoadStats, load_model
from shardline.model.parallel_context import ParallelContext
from shardline.model.registry import ModelRegistry
from support.tiny_models import make_tiny_model_dir


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def tp1_logits(path: pathlib.Path, worker_module, architecture: str | None = None):
    config = ModelConfig.from_path(path, architecture=architecture)
    stats = LoadStats()
    model = load_model(config, ParallelContext.single(), stats)
    return worker_module.run_scenario(model, config.hf_config.vocab_size), stats.bytes_read


def hf_logits(path: pathlib.Path, tokens: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    from support.hf_reference import hf_causal_lm

    hf = hf_causal_lm(path)
    with torch.no_grad():
        return {n: hf(torch.tensor([t])).logits[0] for n, t in tokens.items()}


def assert_same_logits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == want[name].shape, name
        err = rel_err(got[name], want[name])
        assert err <= tol, f"request {name}: relative error {err:.2e} > {tol:.0e}"


def test_tiny_llama_and_qwen2_tp2_match_tp1_and_transformers(tmp_path, run_tp, worker_module):
    llama = make_tiny_model_dir(tmp_path / "llama", arch="LlamaForCausalLM", num_heads=4,
                                num_kv_heads=2, vocab_size=321)  # 321: padded vocab shards
    qwen2 = make_tiny_model_dir(tmp_path / "qwen2", arch="Qwen2ForCausalLM", num_heads=4,
                                num_kv_heads=2, tie_word_embeddings=True, shards=3, seed=1)
    results = run_tp(2, [{"name": "llama", "path": str(llama)}, {"name": "qwen2", "path": str(qwen2)}])
    for name, path in (("llama", llama), ("qwen2", qwen2)):
        single, single_bytes = tp1_logits(path, worker_module)
        tokens = worker_module.scenario_tokens(ModelConfig.from_path(path).hf_config.vocab_size)
        assert_same_logits(single, hf_logits(path, tokens), 1e-5)
        for rank in (0, 1):
            result = results[(name, rank)]
            assert_same_logits(result["logits"], single, 1e-5)
            # Each rank read its shards, not the whole checkpoint (norms are replicated).
            assert result["bytes_read"] < 0.6 * single_bytes


def test_tp4_replicates_two_kv_heads(tmp_path, run_tp, worker_module):
    path = make_tiny_model_dir(tmp_path / "llama", num_heads=4, num_kv_heads=2, seed=3)
    results = run_tp(4, [{"name": "llama", "path": str(path)}])
    single, _ = tp1_logits(path, worker_module)
    for rank in range(4):
        assert_same_logits(results[("llama", rank)]["logits"], single, 1e-5)


def test_registered_factory_runs_in_each_worker_with_its_rank(tmp_path, run_tp):
    from support.tiny_models import recording_factory

    path = make_tiny_model_dir(tmp_path / "m")
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    ModelRegistry.register_model("RecordingForCausalLM", recording_factory)
    try:
        specs = ModelRegistry.specs()
    finally:
        ModelRegistry.unregister("RecordingForCausalLM")
    assert specs["RecordingForCausalLM"] == "support.tiny_models:recording_factory"
    run_tp(2, [{"name": "rec", "path": str(path), "architecture": "RecordingForCausalLM",
                "run": False}], registry=specs, env={"SHARDLINE_TEST_RECORD_DIR": str(record_dir)})
    import json

    seen = sorted((json.loads(p.read_text()) for p in record_dir.glob("rank-*.json")),
                  key=lambda s: s["tp_rank"])
    assert [(s["tp_rank"], s["tp_size"]) for s in seen] == [(0, 2), (1, 2)]
    assert all(s["has_group"] and s["pp_size"] == 1 for s in seen)
    assert seen[0]["pid"] != seen[1]["pid"]


@pytest.mark.slow
def test_smollm2_tp3_matches_tp1(smollm2_dir, run_tp, worker_module):
    results = run_tp(3, [{"name": "smollm2", "path": str(smollm2_dir)}], timeout=500)
    single, _ = tp1_logits(smollm2_dir, worker_module)
    for rank in range(3):
        assert_same_logits(results[("smollm2", rank)]["logits"], single, 1e-5)
