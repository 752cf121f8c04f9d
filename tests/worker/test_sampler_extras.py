"""Sampler: logit_bias and min_tokens, vectorised over the batch, against a naive reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardline.transport.messages import SamplingOptions
from shardline.worker import sampler
from shardline.worker.sampler import RequestSamplingState, prompt_token_logprobs, sample

CPU = torch.device("cpu")


def options(**overrides: object) -> SamplingOptions:
    fields: dict[str, object] = dict(
        temperature=0.0, top_k=-1, top_p=1.0, min_p=0.0, seed=None, presence_penalty=0.0,
        frequency_penalty=0.0, repetition_penalty=1.0, num_logprobs=None,
    )  # fmt: skip
    fields.update(overrides)
    return SamplingOptions(**fields)  # type: ignore[arg-type]


def biased(bias: dict[int, float], **overrides: object) -> SamplingOptions:
    ids = sorted(bias)
    return options(logit_bias_ids=ids, logit_bias_values=[bias[i] for i in ids], **overrides)


def state(opts: SamplingOptions, prompt: list[int] | None = None, seed: int = 0) -> RequestSamplingState:
    return RequestSamplingState(opts, prompt or [0], seed=seed, device=CPU)


def test_bias_bans_and_forces_tokens_per_row() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    argmax = logits.argmax(-1).tolist()
    states = [
        state(options()),  # untouched row beside biased ones
        state(biased({argmax[1]: -100.0})),
        state(biased({7: 100.0})),
        state(biased({argmax[3]: -100.0, 11: 100.0})),
    ]
    out = sample(logits.clone(), states).token_ids
    assert out[0] == argmax[0]
    assert out[1] != argmax[1] and out[1] == logits[1].topk(2).indices[1].item()
    assert out[2] == 7
    assert out[3] == 11


def test_bias_applies_to_random_sampling_too() -> None:
    logits = torch.zeros(1, 20)
    st_ = state(biased({4: 100.0}, temperature=1.0), seed=3)
    for _ in range(20):
        token = sample(logits.clone(), [st_]).token_ids[0]
        assert token == 4
        st_.append_output([token])


def test_logprobs_are_of_the_raw_distribution() -> None:
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(1))
    raw = torch.log_softmax(logits, dim=-1)
    states = [state(biased({3: 100.0}, num_logprobs=2)), state(options(num_logprobs=0, min_tokens=5,
                                                                       min_tokens_stop_ids=[int(logits[1].argmax())]))]
    out = sample(logits.clone(), states)
    assert out.token_ids[0] == 3
    assert out.logprobs is not None
    first, second = out.logprobs
    assert first is not None and second is not None
    assert math.isclose(first.logprob, raw[0, 3].item(), rel_tol=1e-5)
    assert first.top_token_ids == raw[0].topk(2).indices.tolist()  # not token 3's +100
    assert math.isclose(second.logprob, raw[1, out.token_ids[1]].item(), rel_tol=1e-5)


def test_min_tokens_masks_stop_ids_until_enough_tokens() -> None:
    logits = torch.zeros(1, 10)
    logits[0, 2] = 5.0  # the stop id is the argmax
    logits[0, 6] = 4.0
    st_ = state(options(min_tokens=3, min_tokens_stop_ids=[2, 9]), prompt=[1, 1, 1])
    tokens = []
    for _ in range(5):
        token = sample(logits.clone(), [st_]).token_ids[0]
        tokens.append(token)
        st_.append_output([token])
    assert tokens == [6, 6, 6, 2, 2]


def test_min_tokens_beats_a_positive_bias_and_ignores_ids_past_the_logits() -> None:
    logits = torch.zeros(1, 8)
    st_ = state(biased({5: 100.0}, min_tokens=1, min_tokens_stop_ids=[5, 40]))
    assert sample(logits.clone(), [st_]).token_ids[0] != 5
    st_.append_output([0])
    assert sample(logits.clone(), [st_]).token_ids[0] == 5


def test_a_batch_without_these_options_takes_no_processing(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("logit edits applied to a batch that asked for none")

    monkeypatch.setattr(sampler, "apply_logit_edits", fail)
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    plain = [state(options()) for _ in range(3)]
    assert sample(logits, plain).token_ids == logits.argmax(-1).tolist()
    # min_tokens already reached (the state is built counting from the prompt it was given):
    done = [state(options(min_tokens=0, min_tokens_stop_ids=[]))]
    assert sample(logits[:1], done).token_ids == logits[:1].argmax(-1).tolist()


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.dictionaries(st.integers(0, 24), st.floats(-100, 100), max_size=6),  # bias
            st.lists(st.integers(0, 24), max_size=3, unique=True),  # stop ids
            st.integers(0, 3),  # min_tokens
            st.integers(0, 3),  # tokens generated so far
        ),
        min_size=1,
        max_size=5,
    ),
    seed=st.integers(0, 2**16),
)
def test_greedy_with_edits_equals_the_dense_reference(rows: list[tuple[dict[int, float], list[int], int, int]], seed: int) -> None:
    """Greedy tokens after bias and min_tokens equal argmax of logits + a dense bias row with
    -inf on the stop ids while the row has fewer than min_tokens outputs."""
    vocab = 25
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(seed))
    expected_logits = logits.clone()
    states = []
    for row, (bias, stop_ids, min_tokens, done) in enumerate(rows):
        opts = biased(bias, min_tokens=min_tokens, min_tokens_stop_ids=sorted(stop_ids)) if bias else \
            options(min_tokens=min_tokens, min_tokens_stop_ids=sorted(stop_ids))
        st_ = state(opts, prompt=[1, 2])
        st_.append_output([0] * done)
        states.append(st_)
        for token_id, value in bias.items():
            expected_logits[row, token_id] += value
        if done < min_tokens:
            expected_logits[row, stop_ids] = -math.inf
    got = sample(logits.clone(), states).token_ids
    assert got == expected_logits.argmax(-1).tolist()


def test_prompt_token_logprobs_match_log_softmax() -> None:
    logits = torch.randn(5, 12, generator=torch.Generator().manual_seed(4))
    targets = torch.tensor([3, 0, 11, 5, 5])
    entries = prompt_token_logprobs(logits, targets, 3)
    reference = torch.log_softmax(logits, dim=-1)
    for row, entry in enumerate(entries):
        assert math.isclose(entry.logprob, reference[row, targets[row]].item(), rel_tol=1e-5)
        values, ids = reference[row].topk(3)
        assert entry.top_token_ids == ids.tolist()
        assert entry.top_logprobs == pytest.approx(values.tolist(), rel=1e-5)
        assert entry.rank == int((reference[row] >= reference[row, targets[row]]).sum())
    assert entries[0].rank == 1 + sorted(reference[0].tolist(), reverse=True).index(reference[0, 3].item())
