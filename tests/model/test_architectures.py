"""Every architecture beyond the Llama family against transformers' own implementation.

Each test builds a tiny random-weight model with transformers' class (support/hf_tiny.py),
loads it with shardline and runs two requests through the paged KV cache: chunked prefills in
a mixed batch, then 20 decode steps of both; every position's logits must be within 1e-4
relative of transformers' forward over the whole sequence. The prompts are longer than the
sliding window of the models that have one.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from shardline.model.config import ModelConfig
from shardline.model.errors import UnknownArchitectureError
from shardline.model.loader import load_model
from shardline.model.moe import fused_experts, route
from shardline.model.parallel_context import ParallelContext
from shardline.model.registry import ModelRegistry
from support.hf_tiny import ARCHITECTURES, make_hf_model_dir

DECODE_STEPS = 20
PROMPTS = {"a": 19, "b": 11}
# {request: tokens} per step: "a" prefills in two chunks beside "b", then both decode.
STEPS = [{"a": 12, "b": 11}, {"a": 7, "b": 1}] + [{"a": 1, "b": 1}] * DECODE_STEPS


def sequences(vocab_size: int = 320, seed: int = 5) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = {"a": PROMPTS["a"] + DECODE_STEPS, "b": PROMPTS["b"] + DECODE_STEPS + 1}
    return {
        name: torch.randint(0, 256, (n,), generator=gen).tolist() for name, n in lengths.items()
    }


def hf_logits(path: pathlib.Path, tokens: dict[str, list[int]], computed: dict[str, int]):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return {n: hf(torch.tensor([t[: computed[n]]])).logits[0] for n, t in tokens.items()}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("archs")
    return {arch: make_hf_model_dir(root / arch, arch) for arch in ARCHITECTURES}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_prefill_and_decode_match_transformers(arch, arch_dirs, worker_module):
    path = arch_dirs[arch]
    config = ModelConfig.from_path(path)
    assert config.architecture == arch
    model = load_model(config, ParallelContext.single())
    tokens = sequences()
    got = worker_module.run_scenario(model, 320, tokens=tokens, steps=STEPS)
    computed = {n: sum(step.get(n, 0) for step in STEPS) for n in tokens}
    want = hf_logits(path, tokens, computed)
    for name in tokens:
        assert got[name].shape == want[name].shape
        err = rel_err(got[name], want[name])
        assert err <= 1e-4, f"{arch} request {name}: relative error {err:.2e}"


def test_unknown_architecture_is_refused_naming_it_and_the_known_ones(arch_dirs):
    config = ModelConfig.from_path(arch_dirs["Qwen3ForCausalLM"], architecture="FalconForCausalLM")
    with pytest.raises(UnknownArchitectureError) as info:
        load_model(config, ParallelContext.single())
    message = str(info.value)
    assert "'FalconForCausalLM'" in message
    for arch in ARCHITECTURES:
        assert arch in message and arch in ModelRegistry.known()


def test_an_expert_without_tokens_adds_nothing_and_the_rest_match_a_dense_reference():
    """Four experts, top-1 over three tokens routed to experts 0, 2, 2: experts 1 and 3 get no
    row in this step; the grouped GEMMs equal each token run through its expert alone."""
    from shardline.model.layers import SiluAndMul

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 8, generator=gen)
    w13 = torch.randn(4, 12, 8, generator=gen)
    w2 = torch.randn(4, 8, 6, generator=gen)
    logits = torch.full((3, 4), -5.0)
    logits[0, 0] = logits[1, 2] = logits[2, 2] = 5.0
    weights, ids = route(logits, 1, False, hidden.dtype)
    assert ids.flatten().tolist() == [0, 2, 2]
    got = fused_experts(hidden, w13, w2, weights, ids, 0, SiluAndMul())
    for t in range(3):
        e = int(ids[t, 0])
        gate, up = (hidden[t] @ w13[e].T).chunk(2)
        want = weights[t, 0] * ((torch.nn.functional.silu(gate) * up) @ w2[e].T)
        torch.testing.assert_close(got[t], want, rtol=1e-5, atol=1e-5)
    # The same call on a rank holding experts 2..3 only: token 0's expert is elsewhere.
    local = fused_experts(hidden, w13[2:], w2[2:], weights, ids, 2, SiluAndMul())
    assert not local[0].any()
    torch.testing.assert_close(local[1:], got[1:])
