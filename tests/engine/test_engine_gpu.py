"""The engine on a CUDA device: same tokens as transformers, streaming, cancellation, recovery.

Marked `gpu`: skipped on machines without CUDA (run with `pytest -m gpu`).
"""

from __future__ import annotations

import pathlib

import anyio
import pytest
import torch

from shardline.engine import Engine, EngineConfig, InvalidRequestError, SamplingParams
from support.generation import generate_all
from support.waiting import wait_until

pytestmark = pytest.mark.gpu

PROMPTS = [[3, 256, 70, 71, 10], [5, 6, 7], list(range(20, 61)), [300, 301, 302, 303, 304, 305, 306]]
NEW_TOKENS = 12


def _cfg(path: pathlib.Path, **kw: object) -> EngineConfig:
    base: dict[str, object] = dict(model=str(path), device="cuda", max_model_len=256, num_kv_blocks=128, block_size=4)
    base.update(kw)
    return EngineConfig(**base)  # type: ignore[arg-type]


def _hf_greedy(path: pathlib.Path, dtype: torch.dtype) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to("cuda").eval()
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt], device="cuda")
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            out.append(gen[0, len(prompt):].tolist())
    return out


async def _generate_all(engine: Engine, params: SamplingParams, prompts: list[list[int]] = PROMPTS) -> list[list[int]]:
    return await generate_all(engine, prompts, params)


@pytest.mark.parametrize("transport", ["inproc", "shm"])
async def test_cuda_engine_matches_transformers_float32(tiny_llama_dir: pathlib.Path, transport: str) -> None:
    """Concurrent greedy requests (continuous batching, paged decode on the GPU) give exactly
    the tokens transformers' `generate` gives on the same GPU, one prompt at a time."""
    want = _hf_greedy(tiny_llama_dir, torch.float32)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    async with await Engine.start(_cfg(tiny_llama_dir, dtype="float32", transport=transport)) as engine:
        got = await _generate_all(engine, params)
    assert got == want


async def test_cuda_engine_default_bfloat16_serves_cancels_and_recovers(tiny_llama_dir: pathlib.Path) -> None:
    """bfloat16 (the CUDA default): streams tokens, a cancelled caller frees its blocks, a bad
    request gets a clear error, and the next request is still served."""
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    async with await Engine.start(_cfg(tiny_llama_dir)) as engine:
        first = await _generate_all(engine, params)
        assert all(len(t) == NEW_TOKENS for t in first)

        with anyio.CancelScope() as scope:  # the caller goes away after its first token
            async for _ in engine.generate(PROMPTS[2], SamplingParams(max_tokens=200, ignore_eos=True)):
                scope.cancel()
        assert scope.cancelled_caught
        with pytest.raises(InvalidRequestError):
            async for _ in engine.generate([10**9], params):
                pass
        again = await _generate_all(engine, params)
        assert again == first
        await wait_until(lambda: engine.stats().num_kv_blocks_used == 0 and engine.stats().num_running == 0)


async def test_cuda_graphs_give_the_eager_tokens(tiny_llama_dir: pathlib.Path) -> None:
    """Decode batches replayed from CUDA graphs (padded to a captured size) give the same
    tokens as eager steps, for batch sizes that hit a captured size exactly and ones that pad."""
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    results = {}
    for graphs in (False, True):
        async with await Engine.start(_cfg(tiny_llama_dir, dtype="float32", cuda_graphs=graphs, max_num_seqs=8)) as engine:
            results[graphs] = [await _generate_all(engine, params, PROMPTS[:k]) for k in (1, 3, 4)]
    assert results[True] == results[False]
