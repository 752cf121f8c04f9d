"""ModelRunner against a real tiny Llama, in-process: paged decode equals HF greedy.

A small test-side scheduler plays the engine: it hands out block ids, sends diffs as
docs/INTERFACES.md section 1 describes, and feeds each sampled token back in the next step.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch

from shardline.transport.messages import (
    CachedRequest,
    ExecuteStep,
    NewRequest,
    SamplingOptions,
    StepResult,
)

BLOCK_SIZE = 4
NUM_BLOCKS = 128
PROMPTS = {
    "a": [5, 17, 33, 2, 90, 41, 7],
    "b": [101, 3, 3, 64, 12, 8, 250, 19, 77, 6, 45, 23, 9],
    "c": [42],
}
NEW_TOKENS = 6


def greedy(num_logprobs: int | None = None) -> SamplingOptions:
    return SamplingOptions(
        temperature=0.0, top_k=-1, top_p=1.0, min_p=0.0, seed=None, presence_penalty=0.0,
        frequency_penalty=0.0, repetition_penalty=1.0, num_logprobs=num_logprobs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir: pathlib.Path) -> Iterator[tuple[object, object]]:
    from shardline.model.config import ModelConfig
    from shardline.model.loader import load_model
    from shardline.model.parallel_context import ParallelContext

    config = ModelConfig.from_path(str(tiny_llama_dir), dtype=torch.float32)
    model = load_model(config, ParallelContext.single())
    yield config, model


@pytest.fixture(scope="module")
def hf_reference(tiny_llama_dir: pathlib.Path) -> dict[str, list[int]]:
    """Hugging Face greedy continuations (full recompute, no paging) of every prompt."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for req_id, prompt in PROMPTS.items():
            ids = torch.tensor([prompt])
            gen = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
            )  # fmt: skip
            out[req_id] = gen[0, len(prompt) :].tolist()
    return out


def make_runner(loaded: tuple[object, object]):  # type: ignore[no-untyped-def]
    from shardline.model.parallel_context import ParallelContext
    from shardline.worker.model_runner import ModelRunner

    config, model = loaded
    runner = ModelRunner(
        model,
        ParallelContext.single(),
        block_size=BLOCK_SIZE,
        dtype=torch.float32,
        seed=0,  # type: ignore[arg-type]
    )
    runner.initialize_kv_cache(NUM_BLOCKS)
    return runner


@dataclass
class FakeRequest:
    req_id: str
    tokens: list[int]
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    unsent: list[int] = field(default_factory=list)  # sampled tokens the workers have not seen
    sent_new: bool = False
    output: list[int] = field(default_factory=list)


class MiniEngine:
    """Just enough of the engine to drive a runner: block ids, diffs, chunking."""

    def __init__(self, runner, chunk: int | None = None) -> None:  # type: ignore[no-untyped-def]
        self.runner = runner
        self.chunk = chunk
        self.free_blocks = list(range(NUM_BLOCKS))
        self.step_id = 0
        self.requests: dict[str, FakeRequest] = {}
        self.finished: list[str] = []

    def add(
        self, req_id: str, prompt: list[int], *, shared_blocks: list[int] | None = None
    ) -> None:
        request = FakeRequest(req_id, list(prompt))
        if shared_blocks:  # a prefix-cache hit: these blocks already hold the prompt's K/V
            request.blocks = list(shared_blocks)
            request.num_computed = len(shared_blocks) * BLOCK_SIZE
        self.requests[req_id] = request

    def _grow(self, request: FakeRequest, upto: int) -> list[int]:
        needed = math.ceil(upto / BLOCK_SIZE) - len(request.blocks)
        new = [self.free_blocks.pop(0) for _ in range(max(0, needed))]
        request.blocks += new
        return new

    def step(self, resume: str | None = None) -> StepResult:
        new_requests, cached = [], []
        for request in self.requests.values():
            remaining = len(request.tokens) - request.num_computed
            count = remaining if self.chunk is None else min(self.chunk, remaining)
            if not request.sent_new:
                self._grow(request, request.num_computed + count)
                new_requests.append(
                    NewRequest(request.req_id, request.tokens[: len(request.tokens)], greedy(),
                               list(request.blocks), request.num_computed, count)
                )  # fmt: skip
                request.sent_new = True
            elif request.req_id == resume:  # recompute preemption: fresh table, nothing cached
                request.blocks, request.num_computed = [], 0
                count = len(request.tokens)
                self._grow(request, count)
                cached.append(
                    CachedRequest(
                        request.req_id, request.unsent, list(request.blocks), 0, count, True
                    )
                )
            else:
                new_blocks = self._grow(request, request.num_computed + count)
                cached.append(
                    CachedRequest(request.req_id, request.unsent, new_blocks, request.num_computed,
                                  count, False)
                )  # fmt: skip
            request.unsent = []
            request.num_computed += count
        step = ExecuteStep(self.step_id, new_requests, cached, self.finished)
        self.step_id += 1
        self.finished = []
        result = self.runner.execute(step)
        assert isinstance(result, StepResult) and result.step_id == step.step_id
        for req_id, token in zip(result.req_ids, result.sampled_token_ids, strict=True):
            request = self.requests[req_id]
            request.tokens.append(token)
            request.unsent.append(token)
            request.output.append(token)
        return result

    def run_until(self, num_new: int, **kw: str) -> dict[str, list[int]]:
        while any(len(r.output) < num_new for r in self.requests.values()):
            self.step(**kw)
        return {rid: r.output[:num_new] for rid, r in self.requests.items()}


def test_batched_paged_decode_matches_hf(loaded, hf_reference) -> None:  # type: ignore[no-untyped-def]
    engine = MiniEngine(make_runner(loaded))
    for req_id, prompt in PROMPTS.items():
        engine.add(req_id, prompt)
    first = engine.step()
    assert first.req_ids == list(PROMPTS)  # every prompt was computed whole, so each samples
    assert engine.run_until(NEW_TOKENS) == hf_reference


def test_chunked_prefill_matches_hf(loaded, hf_reference) -> None:  # type: ignore[no-untyped-def]
    engine = MiniEngine(make_runner(loaded), chunk=3)
    for req_id, prompt in PROMPTS.items():
        engine.add(req_id, prompt)
    first = engine.step()
    assert first.req_ids == ["c"]  # the others are mid-prefill and sample nothing
    assert engine.run_until(NEW_TOKENS) == hf_reference


def test_prefix_hit_reuses_cached_blocks(loaded, hf_reference) -> None:  # type: ignore[no-untyped-def]
    runner = make_runner(loaded)
    engine = MiniEngine(runner)
    engine.add("b", PROMPTS["b"])
    engine.step()
    shared = engine.requests["b"].blocks[:2]  # the first 8 prompt tokens' K/V
    prompt = PROMPTS["b"][:8] + [11, 12, 13]
    engine.add("hit", prompt, shared_blocks=shared)
    engine.run_until(NEW_TOKENS)
    # Same tokens as computing the whole prompt afresh in another runner.
    fresh = MiniEngine(make_runner(loaded))
    fresh.add("hit", prompt)
    assert engine.requests["hit"].output[:NEW_TOKENS] == fresh.run_until(NEW_TOKENS)["hit"]
    assert engine.requests["b"].output[:NEW_TOKENS] == hf_reference["b"]


def test_resumed_request_replaces_block_table(loaded, hf_reference) -> None:  # type: ignore[no-untyped-def]
    runner = make_runner(loaded)
    engine = MiniEngine(runner)
    for req_id, prompt in PROMPTS.items():
        engine.add(req_id, prompt)
    engine.step()
    engine.step()
    old_blocks = runner.requests["a"].block_table.tolist()
    engine.step(resume="a")
    assert runner.requests["a"].block_table.tolist() == engine.requests["a"].blocks
    assert set(runner.requests["a"].block_table.tolist()).isdisjoint(old_blocks)
    assert engine.run_until(NEW_TOKENS) == hf_reference


def test_finished_ids_drop_state(loaded) -> None:  # type: ignore[no-untyped-def]
    runner = make_runner(loaded)
    engine = MiniEngine(runner)
    engine.add("a", PROMPTS["a"])
    engine.add("c", PROMPTS["c"])
    engine.step()
    engine.finished = ["a"]
    del engine.requests["a"]
    result = engine.step()
    assert set(runner.requests) == {"c"} and result.req_ids == ["c"]
    stale = CachedRequest("a", [1], [], len(PROMPTS["a"]) + 1, 1, False)
    with pytest.raises(KeyError, match="'a'"):
        runner.execute(ExecuteStep(99, [], [stale], []))


def test_empty_step_answers_with_no_tokens(loaded) -> None:  # type: ignore[no-untyped-def]
    result = make_runner(loaded).execute(ExecuteStep(7, [], [], ["unknown"]))
    assert result == StepResult(step_id=7, req_ids=[], sampled_token_ids=[], logprobs=None)


def test_logprobs_reach_the_result(loaded) -> None:  # type: ignore[no-untyped-def]
    runner = make_runner(loaded)
    new = NewRequest("lp", PROMPTS["a"], greedy(num_logprobs=2), [0, 1], 0, len(PROMPTS["a"]))
    result = runner.execute(ExecuteStep(0, [new], [], []))
    assert result is not None and result.logprobs is not None
    entry = result.logprobs[0]
    assert entry is not None and entry.top_token_ids[0] == result.sampled_token_ids[0]
    assert len(entry.top_logprobs) == 2 and entry.logprob == pytest.approx(entry.top_logprobs[0])


def test_kv_cache_shapes_and_sizing(loaded) -> None:  # type: ignore[no-untyped-def]
    from shardline.worker.kv_cache import attention_layers, bytes_per_block, determine_num_blocks

    config, model = loaded
    layers = attention_layers(model)  # type: ignore[arg-type]
    assert layers, "the tiny model has attention layers"
    per_block = bytes_per_block(layers, BLOCK_SIZE, torch.float32)
    kw = dict(block_size=BLOCK_SIZE, dtype=torch.float32, device=torch.device("cpu"),
              num_kv_blocks=None, max_model_len=256, max_num_seqs=4)  # fmt: skip
    assert determine_num_blocks(model, kv_cache_memory_bytes=per_block * 10 + 1, **kw) == 10  # type: ignore[arg-type]
    # Capped at what max_num_seqs sequences of max_model_len could ever use (plus slack).
    assert determine_num_blocks(model, kv_cache_memory_bytes=per_block * 10**6, **kw) == 4 * 64 + 4  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="holds no block"):
        determine_num_blocks(model, kv_cache_memory_bytes=per_block - 1, **kw)  # type: ignore[arg-type]
    make_runner(loaded)
    for layer in layers:
        assert tuple(layer.kv_cache.shape) == (
            NUM_BLOCKS,
            2,
            BLOCK_SIZE,
            layer.num_kv_heads,
            layer.head_dim,
        )


@pytest.mark.gpu
def test_paged_decode_on_cuda_matches_hf(tiny_llama_dir: pathlib.Path, hf_reference) -> None:  # type: ignore[no-untyped-def]
    from shardline.model.config import ModelConfig
    from shardline.model.loader import load_model
    from shardline.model.parallel_context import ParallelContext
    from shardline.worker.model_runner import ModelRunner

    context = ParallelContext.single("cuda")
    config = ModelConfig.from_path(str(tiny_llama_dir), dtype=torch.float32)
    model = load_model(config, context)
    runner = ModelRunner(model, context, block_size=BLOCK_SIZE, dtype=torch.float32)
    runner.initialize_kv_cache(NUM_BLOCKS)
    engine = MiniEngine(runner, chunk=5)
    for req_id, prompt in PROMPTS.items():
        engine.add(req_id, prompt)
    assert engine.run_until(NEW_TOKENS) == hf_reference


def _graph_decoder_matches_hf(loaded, hf_reference, device: str) -> None:  # type: ignore[no-untyped-def]
    """A CudaGraphDecoder with key-length buckets of 2, 4, 8 and 16 blocks (8-64 tokens) runs
    the MiniEngine's requests to HF's greedy tokens, its decode batches padded to captured sizes
    and replayed from the bucket that holds the longest request."""
    from shardline.worker.cuda_graphs import CudaGraphDecoder
    from shardline.worker.model_runner import ModelRunner

    config, model = loaded
    if device == "cpu":
        runner = make_runner(loaded)
    else:
        from shardline.model.loader import load_model
        from shardline.model.parallel_context import ParallelContext

        context = ParallelContext.single("cuda")
        model = load_model(config, context)
        runner = ModelRunner(model, context, block_size=BLOCK_SIZE, dtype=torch.float32)
    runner.initialize_kv_cache(NUM_BLOCKS, scratch_blocks=1)  # block NUM_BLOCKS: the scratch
    decoder = CudaGraphDecoder(model, block_size=BLOCK_SIZE, max_model_len=64, max_num_seqs=8,
                               pad_block=NUM_BLOCKS, device=torch.device(device), smallest_bucket=2)
    assert decoder.buckets == [2, 4, 8, 16]
    if device == "cuda":
        decoder.capture()
        assert len(decoder.graphs) == len(decoder.sizes) * len(decoder.buckets)
    replayed: list[tuple[int, int]] = []
    load = decoder._load_inputs
    decoder._load_inputs = lambda *a: replayed.append(load(*a)) or replayed[-1]  # type: ignore[method-assign]
    runner.model = decoder
    engine = MiniEngine(runner, chunk=5)
    for req_id, prompt in PROMPTS.items():
        engine.add(req_id, prompt)
    assert engine.run_until(NEW_TOKENS) == hf_reference
    assert 4 in {size for size, _ in replayed}  # three requests decoding together, padded to 4
    assert {blocks for _, blocks in replayed} == {4, 8}  # longest context 14-19 tokens: 16, 32 keys


def test_cuda_graph_static_decode_step_matches_hf(loaded, hf_reference) -> None:  # type: ignore[no-untyped-def]
    """The steps CUDA graphs capture, run eagerly here: the decode batch of 3 is padded to the
    captured size 4 (the pad row writes into a scratch block), attention spans its bucket's
    keys under the length mask, and the tokens are still HF's."""
    from shardline.worker.cuda_graphs import capture_sizes, kv_buckets

    assert capture_sizes(8) == [1, 2, 4, 8] and capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert kv_buckets(64) == [16, 32, 64] and kv_buckets(100) == [16, 32, 64, 100]
    assert kv_buckets(8) == [8] and kv_buckets(5, smallest=2) == [2, 4, 5]
    _graph_decoder_matches_hf(loaded, hf_reference, "cpu")


@pytest.mark.gpu
def test_cuda_graphs_with_key_buckets_match_hf(loaded, hf_reference) -> None:  # type: ignore[no-untyped-def]
    """The same on CUDA, every (batch size, bucket) graph captured and replayed."""
    _graph_decoder_matches_hf(loaded, hf_reference, "cuda")
