"""Speculative decoding, worker side: verify a step's draft tokens against the model's logits.

A speculating request's chunk is its last token followed by k draft tokens d_1..d_k
(engine/speculative.py proposes them); its k + 1 logits rows L_0..L_k score the tokens after
each. Verification (vLLM's rejection sampler with a deterministic draft: the n-gram draft is a
point mass):

* greedy: d_{j+1} is accepted while it is the argmax of L_j; the first mismatch is replaced by
  that argmax; when all k are accepted, the argmax of L_k is a bonus token. The tokens equal
  those of decoding one token a step.
* temperature > 0 (no top-k / top-p / min-p: such requests do not speculate): with
  p_j = softmax(L_j / T), d_{j+1} is accepted with probability p_j(d_{j+1}); on a rejection
  the token is drawn from p_j with d_{j+1} removed, renormalised; after k acceptances the bonus
  is drawn from p_k. Each emitted token is distributed as p given the tokens before it, as
  without speculation. Uniform numbers are counter-based (seed, position, purpose), as the
  sampler's, so a seeded request repeats itself.

Requests of the step without drafts are sampled by `sampler.sample` as in any step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shardline.transport.messages import SampleLogprobs
from shardline.worker.draw import draw_tokens
from shardline.worker.sampler import (
    RequestSamplingState,
    TokenMasks,
    _logprob_entries,
    _mix,
    greedy_tokens,
    sample,
)

_ACCEPT_SALT = 0x5EC0_0001
_RESIDUAL_SALT = 0x5EC0_0002


@dataclass(frozen=True)
class VerifyOutput:
    """Per request of the batch: the tokens to append (accepted drafts, then one of its own),
    how many drafts were accepted, and the logprobs entries of those tokens (when asked)."""

    token_ids: list[list[int]]
    num_accepted: list[int]
    logprobs: list[list[SampleLogprobs] | None] | None


def _uniform(seed: int, position: int, salt: int) -> float:
    return (_mix(seed ^ salt, position) >> 10) / float(1 << 53)


def verify(
    logits: torch.Tensor,
    states: Sequence[RequestSamplingState],
    drafts: Sequence[Sequence[int]],
    req_ids: Sequence[str],
    *,
    with_logprobs: bool,
    masks: tuple[list[str], object] | None = None,
) -> VerifyOutput:
    """Verify a batch: request i owns ``len(drafts[i]) + 1`` consecutive rows of ``logits``.

    ``masks``: (bitmask_req_ids, int32 words) of constrained requests (never speculating:
    they are sampled with `sample` under their masks)."""
    counts = [len(d) + 1 for d in drafts]
    if logits.dim() != 2 or logits.shape[0] != sum(counts) or len(states) != len(drafts):
        raise ValueError(
            f"logits shape {tuple(logits.shape)} does not match drafts of {len(drafts)} requests"
        )
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    token_ids: list[list[int]] = [[] for _ in states]
    num_accepted = [0] * len(states)
    entries: list[list[SampleLogprobs] | None] = [None] * len(states)
    want_logprobs = with_logprobs and any(s.options.num_logprobs is not None for s in states)

    plain = [i for i, d in enumerate(drafts) if not d]
    if plain:
        token_masks = None
        if masks is not None:
            mask_ids, words = masks
            token_masks = TokenMasks.for_batch(mask_ids, words, [req_ids[i] for i in plain])  # type: ignore[arg-type]
        rows = torch.tensor([starts[i] for i in plain], dtype=torch.int64, device=logits.device)
        out = sample(
            logits[rows], [states[i] for i in plain], with_logprobs=with_logprobs, masks=token_masks
        )
        for index, i in enumerate(plain):
            token_ids[i] = [out.token_ids[index]]
            if out.logprobs is not None and out.logprobs[index] is not None:
                entries[i] = [out.logprobs[index]]  # type: ignore[list-item]

    spec = [i for i, d in enumerate(drafts) if d]
    if not spec:
        return VerifyOutput(token_ids, num_accepted, entries if want_logprobs else None)
    spec_rows = torch.tensor(
        [r for i in spec for r in range(starts[i], starts[i + 1])], device=logits.device
    )
    spec_logits = logits[spec_rows].float()
    greedy = greedy_tokens(spec_logits).tolist()
    offset = 0
    for i in spec:
        state, draft = states[i], drafts[i]
        if state.is_random:
            chosen = _verify_random(spec_logits[offset : offset + len(draft) + 1], state, draft)
        else:
            chosen = _verify_greedy(greedy[offset : offset + len(draft) + 1], draft)
        token_ids[i] = chosen
        num_accepted[i] = len(chosen) - 1
        if want_logprobs and state.options.num_logprobs is not None:
            raw = torch.log_softmax(spec_logits[offset : offset + len(chosen)], dim=-1)
            chosen_t = torch.tensor(chosen, dtype=torch.int64, device=raw.device)
            entries[i] = _logprob_entries(raw, chosen_t, [state.options.num_logprobs] * len(chosen))
        offset += len(draft) + 1
    return VerifyOutput(token_ids, num_accepted, entries if want_logprobs else None)


def _verify_greedy(argmax: list[int], draft: Sequence[int]) -> list[int]:
    out: list[int] = []
    for j, token in enumerate(draft):
        if argmax[j] != token:
            break
        out.append(token)
    out.append(argmax[len(out)])
    return out


def _verify_random(
    logits: torch.Tensor, state: RequestSamplingState, draft: Sequence[int]
) -> list[int]:
    """Rejection sampling against a point-mass draft (see the module docstring)."""
    logprobs = torch.log_softmax(logits.double() / state.options.temperature, dim=-1)
    position = state.num_tokens  # of the first token this step emits
    out: list[int] = []
    for j, token in enumerate(draft):
        row = logprobs[j]
        if _uniform(state.seed, position + j, _ACCEPT_SALT) < math.exp(float(row[token])):
            out.append(token)
            continue
        residual = row.clone()
        residual[token] = -math.inf
        out.append(_draw(residual, _uniform(state.seed, position + j, _RESIDUAL_SALT)))
        return out
    bonus = len(draft)
    out.append(_draw(logprobs[bonus], _uniform(state.seed, position + bonus, _RESIDUAL_SALT)))
    return out


def _draw(log_weights: torch.Tensor, u: float) -> int:
    """A draw from one row of log-weights at `u`, as the sampler draws (worker/draw.py)."""
    return int(draw_tokens(log_weights.unsqueeze(0), top_k=[-1], top_p=[1.0], min_p=[0.0], uniforms=[u])[0])
