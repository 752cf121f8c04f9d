"""The new architectures split over ranks give the single-rank logits: TP=2 for every one,
expert parallelism (EP=2 over the TP ranks, both ways of combining the experts' rows) for the
MoE models, and an impossible expert split refused naming the numbers."""

from __future__ import annotations

import pytest
import torch

from shardline.model.config import ModelConfig, check_expert_split
from shardline.model.loader import load_model
from shardline.model.parallel_context import ParallelContext
from support.hf_tiny import ARCHITECTURES, MOE_ARCHITECTURES, make_hf_model_dir


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def single_rank_logits(path, worker_module):
    model = load_model(ModelConfig.from_path(path), ParallelContext.single())
    return worker_module.run_scenario(model, 320)


def hf_logits(path, worker_module):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = worker_module.scenario_tokens(320)
    with torch.no_grad():
        return {n: hf(torch.tensor([t])).logits[0] for n, t in tokens.items()}


def assert_close(got, want, tol, what):
    for name in want:
        err = rel_err(got[name], want[name])
        assert err <= tol, f"{what} request {name}: relative error {err:.2e}"


def test_every_architecture_tp2_matches_tp1(tmp_path, run_tp, worker_module):
    paths = {arch: make_hf_model_dir(tmp_path / arch, arch, seed=2) for arch in ARCHITECTURES}
    results = run_tp(2, [{"name": arch, "path": str(p)} for arch, p in paths.items()])
    for arch, path in paths.items():
        single = single_rank_logits(path, worker_module)
        for rank in (0, 1):
            assert_close(results[(arch, rank)]["logits"], single, 1e-5, f"{arch} TP=2 rank {rank}")


@pytest.mark.parametrize("comm", ["allreduce", "alltoall"])
def test_expert_parallel_matches_ep1_and_transformers(tmp_path, run_tp, worker_module, comm):
    paths = {arch: make_hf_model_dir(tmp_path / arch, arch, seed=3) for arch in MOE_ARCHITECTURES}
    results = run_tp(
        2,
        [{"name": arch, "path": str(p)} for arch, p in paths.items()],
        env={"SHARDLINE_EP_COMM": comm},
        enable_expert_parallel=True,
    )
    for arch, path in paths.items():
        single = single_rank_logits(path, worker_module)
        assert_close(single, hf_logits(path, worker_module), 1e-4, f"{arch} EP=1 vs transformers")
        for rank in (0, 1):
            assert_close(results[(arch, rank)]["logits"], single, 1e-5, f"{arch} EP=2 rank {rank}")


def test_an_impossible_expert_split_is_refused_naming_the_numbers():
    with pytest.raises(ValueError, match=r"cannot split num_experts=6 evenly \(6 % 4 = 2\)"):
        check_expert_split(6, 4)
    with pytest.raises(ValueError, match=r"over 8 ranks cannot split num_experts=4"):
        check_expert_split(4, 8)
    check_expert_split(8, 4)
