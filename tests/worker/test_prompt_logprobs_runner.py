"""ModelRunner prompt logprobs: chunked prefill, a recompute after preemption, against HF."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest
import torch

from shardline.transport.messages import (
    CachedRequest,
    ExecuteStep,
    NewRequest,
    PromptLogprobs,
    SamplingOptions,
    StepResult,
)

BLOCK_SIZE = 4
PROMPT = [5, 17, 33, 2, 90, 41, 7, 101, 3, 64]


def opts(prompt_logprobs: int | None) -> SamplingOptions:
    return SamplingOptions(
        temperature=0.0, top_k=-1, top_p=1.0, min_p=0.0, seed=None, presence_penalty=0.0,
        frequency_penalty=0.0, repetition_penalty=1.0, num_logprobs=None,
        prompt_logprobs=prompt_logprobs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def runner(tiny_llama_dir: pathlib.Path) -> Iterator[object]:
    from shardline.model.config import ModelConfig
    from shardline.model.loader import load_model
    from shardline.model.parallel_context import ParallelContext
    from shardline.worker.model_runner import ModelRunner

    config = ModelConfig.from_path(str(tiny_llama_dir), dtype=torch.float32)
    model = load_model(config, ParallelContext.single())
    runner = ModelRunner(model, ParallelContext.single(), block_size=BLOCK_SIZE, dtype=torch.float32)
    runner.initialize_kv_cache(32)
    yield runner


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: pathlib.Path) -> torch.Tensor:
    """HF log-softmax over every prompt position: row i scores token i + 1."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([PROMPT])).logits[0].float(), dim=-1)


def _step(runner: object, step_id: int, new: list[NewRequest] = (), cached: list[CachedRequest] = (),  # type: ignore[assignment]
          finished: list[str] = ()) -> StepResult:  # type: ignore[assignment]
    result = runner.execute(ExecuteStep(step_id, list(new), list(cached), list(finished)))  # type: ignore[attr-defined]
    assert isinstance(result, StepResult)
    return result


def test_chunks_and_a_recompute_report_each_position_once(runner: object, reference: torch.Tensor) -> None:
    k = 3
    # chunk [0, 6): scores prompt tokens 1..6 (its last position scores the next chunk's first token)
    first = _step(runner, 1, new=[NewRequest("p", PROMPT, opts(k), [0, 1], 0, 6)])
    assert first.req_ids == []  # a partial chunk samples nothing
    # preempted, resumed with a new table, recomputes [0, 8): only tokens 7 and 8 are new
    second = _step(runner, 2, cached=[CachedRequest("p", [], [4, 5, 6], 0, 8, True)])
    # the last chunk [8, 10) scores token 9 and samples
    third = _step(runner, 3, cached=[CachedRequest("p", [], [], 8, 2, False)])
    assert third.req_ids == ["p"]
    # (a decode step after the prompt reports nothing more)
    sampled = third.sampled_token_ids
    fourth = _step(runner, 4, cached=[CachedRequest("p", sampled, [7], 10, 1, False)])
    assert fourth.prompt_logprobs == []

    parts = [r.prompt_logprobs for r in (first, second, third)]
    assert [[(p.req_id, p.first_position, len(p.entries)) for p in part] for part in parts] == [
        [("p", 1, 6)], [("p", 7, 2)], [("p", 9, 1)]
    ]
    entries = [e for part in parts for p in part for e in p.entries]
    for position, entry in zip(range(1, len(PROMPT)), entries, strict=True):
        row = reference[position - 1]
        assert entry.logprob == pytest.approx(row[PROMPT[position]].item(), abs=1e-4)
        values, ids = row.topk(k)
        assert entry.top_token_ids == ids.tolist()
        assert entry.top_logprobs == pytest.approx(values.tolist(), abs=1e-4)
    runner.execute(ExecuteStep(6, [], [], ["p"]))  # type: ignore[attr-defined]


def test_requests_beside_each_other_get_their_own_top_k(runner: object, reference: torch.Tensor) -> None:
    """Two requests in one step with different k, and one that did not ask."""
    result = _step(runner, 10, new=[
        NewRequest("a", PROMPT, opts(0), [10, 11, 12], 0, len(PROMPT)),
        NewRequest("b", PROMPT, opts(None), [13, 14, 15], 0, len(PROMPT)),
        NewRequest("c", PROMPT[:5], opts(2), [16, 17], 0, 5),
    ])
    assert result.req_ids == ["a", "b", "c"]
    by_id: dict[str, PromptLogprobs] = {p.req_id: p for p in result.prompt_logprobs}
    assert set(by_id) == {"a", "c"}
    assert by_id["a"].first_position == 1 and len(by_id["a"].entries) == len(PROMPT) - 1
    assert all(e.top_token_ids == [] for e in by_id["a"].entries)
    assert len(by_id["c"].entries) == 4 and all(len(e.top_token_ids) == 2 for e in by_id["c"].entries)
    for position, entry in enumerate(by_id["c"].entries, start=1):
        assert entry.logprob == pytest.approx(reference[position - 1, PROMPT[position]].item(), abs=1e-4)
    runner.execute(ExecuteStep(11, [], [], ["a", "b", "c"]))  # type: ignore[attr-defined]
