"""Speculative decoding, worker side: verification of draft tokens (worker/speculative.py)."""

from __future__ import annotations

from collections import Counter

import torch

from shardline.engine.request import SamplingParams
from shardline.transport.messages import SamplingOptions
from shardline.worker.sampler import RequestSamplingState, sample
from shardline.worker.speculative import verify

CPU = torch.device("cpu")


def _state(
    temperature: float, seed: int = 0, num_logprobs: int | None = None, prompt_len: int = 3
) -> RequestSamplingState:
    options = _options(temperature, seed, num_logprobs)
    return RequestSamplingState(options, list(range(prompt_len)), seed=seed, device=CPU)


def _options(temperature: float, seed: int, num_logprobs: int | None) -> SamplingOptions:
    params = SamplingParams(max_tokens=8, temperature=temperature, seed=seed, logprobs=num_logprobs)
    return params.to_options(eos_token_ids=frozenset())


def test_greedy_accepts_the_matching_prefix_then_corrects() -> None:
    logits = torch.full((4, 6), -5.0)
    for row, best in enumerate([2, 4, 1, 3]):
        logits[row, best] = 5.0
    states = [_state(0.0)]
    assert verify(logits, states, [[2, 4, 0]], ["a"], with_logprobs=True).token_ids == [[2, 4, 1]]
    out = verify(logits, states, [[2, 4, 1]], ["a"], with_logprobs=True)
    assert out.token_ids == [[2, 4, 1, 3]] and out.num_accepted == [3]  # all accepted + bonus
    assert verify(logits, states, [[0, 4, 1]], ["a"], with_logprobs=True).token_ids == [[2]]


def test_mixed_batch_rows_and_logprobs() -> None:
    """A request without drafts (one row) beside one with two: rows in order, logprobs of each
    emitted token from the raw distribution."""
    torch.manual_seed(0)
    logits = torch.randn(4, 9)
    plain, spec = _state(0.0, num_logprobs=2), _state(0.0, num_logprobs=1)
    first = int(logits[1].argmax())
    out = verify(logits, [plain, spec], [[], [first, 99 % 9]], ["p", "s"], with_logprobs=True)
    assert out.token_ids[0] == [int(logits[0].argmax())]
    assert out.token_ids[1][0] == first
    assert out.logprobs is not None
    entries = out.logprobs[1]
    assert entries is not None and len(entries) == len(out.token_ids[1])
    raw = torch.log_softmax(logits[1:], dim=-1)
    for j, (entry, token) in enumerate(zip(entries, out.token_ids[1], strict=True)):
        assert abs(entry.logprob - float(raw[j, token])) < 1e-5
        assert len(entry.top_token_ids) == 1
    reference = sample(logits[:1].clone(), [_state(0.0, num_logprobs=2)])
    assert out.logprobs[0] is not None and out.logprobs[0][0] == reference.logprobs[0]  # type: ignore[index]


def _chi_square(
    observed: Counter[object], expected: dict[object, float], total: int
) -> tuple[float, int]:
    """Pearson's statistic over categories expected at least 5 times (the rest pooled)."""
    stat, pooled_obs, pooled_exp, dof = 0.0, 0, 0.0, -1
    for key, prob in expected.items():
        exp = prob * total
        if exp >= 5:
            stat += (observed.get(key, 0) - exp) ** 2 / exp
            dof += 1
        else:
            pooled_obs += observed.get(key, 0)
            pooled_exp += exp
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        dof += 1
    unexpected = sum(v for k, v in observed.items() if k not in expected)
    assert unexpected == 0
    return stat, dof


def test_rejection_sampling_keeps_the_distribution() -> None:
    """Many seeded draws of (first token, bonus token when the draft was accepted) match
    p0(first) and p0(d) * p1(bonus): accepted with p0(d), otherwise the residual."""
    torch.manual_seed(1)
    vocab, temperature = 8, 0.7
    logits = torch.randn(2, vocab) * 1.5
    p = torch.softmax(logits.double() / temperature, dim=-1)
    for draft in (int(p[0].argmax()), int(p[0].argmin())):  # a likely draft and an unlikely one
        expected: dict[object, float] = {}
        for a in range(vocab):
            if a != draft:
                expected[(a,)] = float(p[0, a])
        for b in range(vocab):
            expected[(draft, b)] = float(p[0, draft] * p[1, b])
        total = 2000
        observed: Counter[object] = Counter()
        for seed in range(total):
            out = verify(
                logits, [_state(temperature, seed=seed)], [[draft]], ["r"], with_logprobs=False
            )
            observed[tuple(out.token_ids[0])] += 1
        stat, dof = _chi_square(observed, expected, total)
        # Generous: the 99.99th percentile of chi-square with dof <= 15 is below 45.
        assert stat < 45, (draft, stat, dof)


def test_seeded_verification_repeats() -> None:
    torch.manual_seed(2)
    logits = torch.randn(3, 16)
    draws = [
        verify(logits, [_state(1.0, seed=7)], [[3, 5]], ["r"], with_logprobs=False).token_ids
        for _ in range(3)
    ]
    assert draws[0] == draws[1] == draws[2]


def test_constrained_rows_beside_drafts_sample_under_their_masks() -> None:
    """A step with drafts: a constrained request (no drafts) keeps its token mask; the rows it
    gets are its own, whatever the speculating request before it takes."""
    import numpy as np

    torch.manual_seed(3)
    logits = torch.randn(4, 40)
    spec, constrained = _state(0.0), _state(0.0)
    words = np.zeros((1, 2), dtype=np.int32)
    words[0, 1] = 1 << 3  # only token 35 allowed
    drafts = [[int(logits[0].argmax()), 0], []]
    out = verify(
        logits, [spec, constrained], drafts, ["s", "c"], with_logprobs=False, masks=(["c"], words)
    )
    assert out.token_ids[1] == [35]
    assert out.token_ids[0][0] == drafts[0][0]
