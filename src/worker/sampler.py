"""Turn logits into tokens: penalties, temperature, top-k / top-p / min-p, seeds, logprobs.

Order of operations (as vLLM): logprobs are taken from the raw logits; then repetition,
frequency and presence penalties; then temperature; then top-k, top-p (on the top-k
renormalised distribution) and min-p masks; then one draw per row.

A row is sampled with the *exponential race*: ``argmax(probs / q)`` with ``q ~ Exp(1)`` drawn
from that request's own ``torch.Generator``. This is an exact sample from ``probs`` and the
noise of a row depends only on its generator, so a seeded request produces the same tokens
whatever else is in the batch. The generator is re-seeded from ``(seed, position of the token
being sampled)`` before each draw, so the tokens also stay the same when a request's state is
rebuilt (a worker restart, a request re-sent in full). Everything but the noise draw is
vectorised over the batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from transport.messages import SampleLogprobs, SamplingOptions

_SEED_MASK = (1 << 63) - 1
_U64 = (1 << 64) - 1


def _mix(seed: int, position: int) -> int:
    """splitmix64 of (seed, position): a well-spread 63-bit seed for one draw."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return (z ^ (z >> 31)) & _SEED_MASK


def derive_seed(worker_seed: int, req_id: str) -> int:
    """A stable 63-bit seed for a request without its own seed (same in every process)."""
    digest = hashlib.sha256(f"{worker_seed}:{req_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & _SEED_MASK


def is_greedy(options: SamplingOptions) -> bool:
    """Temperature 0 (or top_k == 1) picks the argmax; no randomness is consumed."""
    return options.temperature == 0.0 or options.top_k == 1


def has_penalties(options: SamplingOptions) -> bool:
    """Whether any of the three penalties changes the logits."""
    return (
        options.presence_penalty != 0.0
        or options.frequency_penalty != 0.0
        or options.repetition_penalty != 1.0
    )


class RequestSamplingState:
    """What the sampler keeps per request: options, generator and penalty bookkeeping.

    Penalty tensors (a ``seen`` mask over prompt + output for the repetition penalty and
    output-token counts for presence/frequency) are updated incrementally as tokens arrive,
    so a step costs O(new tokens), not O(context length).
    """

    def __init__(
        self,
        options: SamplingOptions,
        prompt_token_ids: Sequence[int],
        *,
        seed: int,
        device: torch.device,
    ) -> None:
        self.options = options
        self.device = device
        self.seed = seed
        self.num_tokens = len(prompt_token_ids)  # position of the next token to sample
        self.generator: torch.Generator | None = None
        if not is_greedy(options):
            self.generator = torch.Generator(device=device)
        self.needs_penalties = has_penalties(options)
        # Tokens not yet folded into the tensors (the vocab size is only known at sampling).
        self._pending_prompt: list[int] = list(prompt_token_ids) if self.needs_penalties else []
        self._pending_output: list[int] = []
        self._seen: torch.Tensor | None = None
        self._output_counts: torch.Tensor | None = None

    def append_output(self, token_ids: Sequence[int]) -> None:
        """Record generated tokens (in order): they move the position and feed the penalties."""
        self.num_tokens += len(token_ids)
        if self.needs_penalties:
            self._pending_output.extend(token_ids)

    def next_generator(self) -> torch.Generator:
        """The generator seeded for the token at the current position (random rows only)."""
        if self.generator is None:
            raise RuntimeError("a greedy request draws no random numbers")
        self.generator.manual_seed(_mix(self.seed, self.num_tokens))
        return self.generator

    def penalty_tensors(self, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(seen [V] bool over prompt+output, output_counts [V] float32)``, brought up to date."""
        if self._seen is None or self._output_counts is None:
            self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
            self._output_counts = torch.zeros(vocab_size, dtype=torch.float32, device=self.device)
        if self._pending_prompt:
            self._seen[self._ids(self._pending_prompt, vocab_size)] = True
            self._pending_prompt = []
        if self._pending_output:
            ids = self._ids(self._pending_output, vocab_size)
            self._seen[ids] = True
            self._output_counts.index_add_(0, ids, torch.ones(len(ids), device=self.device))
            self._pending_output = []
        return self._seen, self._output_counts

    def _ids(self, token_ids: list[int], vocab_size: int) -> torch.Tensor:
        ids = torch.tensor(token_ids, dtype=torch.int64)
        # A token id outside the logits (e.g. a padded special id) cannot be penalised.
        ids = ids[(ids >= 0) & (ids < vocab_size)]
        return ids.to(self.device)


@dataclass(frozen=True)
class SamplerOutput:
    """One sampled token per row, and the logprobs where a request asked for them."""

    token_ids: list[int]
    logprobs: list[SampleLogprobs | None] | None


def sample(logits: torch.Tensor, states: Sequence[RequestSamplingState]) -> SamplerOutput:
    """Sample one token per row of ``logits`` [N, V] using each row's request state."""
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(
            f"logits shape {tuple(logits.shape)} does not match {len(states)} requests"
        )
    if not states:
        return SamplerOutput(token_ids=[], logprobs=None)
    logits = logits.float()
    options = [s.options for s in states]
    want_logprobs = any(o.num_logprobs is not None for o in options)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    any_penalties = any(s.needs_penalties for s in states)
    if all(is_greedy(o) for o in options) and not any_penalties and raw_logprobs is None:
        return SamplerOutput(token_ids=logits.argmax(dim=-1).tolist(), logprobs=None)

    if any_penalties:
        logits = apply_penalties(logits, states)
    token_ids = _draw(logits, states)
    logprobs = (
        _gather_logprobs(raw_logprobs, token_ids, options) if raw_logprobs is not None else None
    )
    return SamplerOutput(token_ids=token_ids.tolist(), logprobs=logprobs)


def apply_penalties(logits: torch.Tensor, states: Sequence[RequestSamplingState]) -> torch.Tensor:
    """Logits after each row's repetition (HF), frequency and presence (OpenAI) penalties."""
    rows = [i for i, s in enumerate(states) if s.needs_penalties]
    vocab_size = logits.shape[1]
    pairs = [states[i].penalty_tensors(vocab_size) for i in rows]
    seen = torch.stack([p[0] for p in pairs])
    counts = torch.stack([p[1] for p in pairs])
    device = logits.device

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)

    repetition = column([states[i].options.repetition_penalty for i in rows])
    frequency = column([states[i].options.frequency_penalty for i in rows])
    presence = column([states[i].options.presence_penalty for i in rows])
    sub = logits[rows]
    # HF: a seen token's positive logit is divided by the penalty, a negative one multiplied.
    penalised = torch.where(sub > 0, sub / repetition, sub * repetition)
    sub = torch.where(seen, penalised, sub)
    # OpenAI: subtract frequency * count and presence * [count > 0] over the output tokens.
    sub = sub - frequency * counts - presence * (counts > 0).float()
    logits = logits.clone()
    logits[rows] = sub
    return logits


def _draw(logits: torch.Tensor, states: Sequence[RequestSamplingState]) -> torch.Tensor:
    greedy_tokens = logits.argmax(dim=-1)
    random_rows = [i for i, s in enumerate(states) if s.generator is not None]
    if not random_rows:
        return greedy_tokens
    device = logits.device
    opts = [states[i].options for i in random_rows]
    sub = logits[random_rows] / torch.tensor(
        [o.temperature for o in opts], dtype=torch.float32, device=device
    ).unsqueeze(1)
    sub = _mask_top_k_top_p(sub, [o.top_k for o in opts], [o.top_p for o in opts])
    if any(o.min_p > 0.0 for o in opts):
        min_p = torch.tensor([o.min_p for o in opts], dtype=torch.float32, device=device)
        probs = torch.softmax(sub, dim=-1)
        threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        sub = sub.masked_fill(probs < threshold, float("-inf"))
    probs = torch.softmax(sub, dim=-1)
    noise = torch.empty_like(probs)
    for row, index in enumerate(random_rows):
        noise[row].exponential_(generator=states[index].next_generator())
    noise.clamp_(min=1e-20)  # an exact 0 draw would divide 0 by 0 for a masked token
    tokens = greedy_tokens.clone()
    tokens[random_rows] = (probs / noise).argmax(dim=-1)
    return tokens


def _mask_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    vocab_size = logits.shape[1]
    use_k = any(0 < k < vocab_size for k in top_k)
    use_p = any(p < 1.0 for p in top_p)
    if not use_k and not use_p:
        return logits
    device = logits.device
    sorted_logits, sorted_index = logits.sort(dim=-1, descending=True)
    if use_k:
        k = torch.tensor([k if 0 < k < vocab_size else vocab_size for k in top_k], device=device)
        ranks = torch.arange(vocab_size, device=device).unsqueeze(0)
        sorted_logits = sorted_logits.masked_fill(ranks >= k.unsqueeze(1), float("-inf"))
    if use_p:
        # p = 1 means off: +inf keeps every token, so a row never depends on its batch mates.
        p = torch.tensor(
            [p if p < 1.0 else float("inf") for p in top_p], dtype=torch.float32, device=device
        ).unsqueeze(1)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first stays).
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= p, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_index, sorted_logits)


def _gather_logprobs(
    raw_logprobs: torch.Tensor, token_ids: torch.Tensor, options: list[SamplingOptions]
) -> list[SampleLogprobs | None]:
    sampled = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1).tolist()
    max_k = max((o.num_logprobs or 0) for o in options)
    top_values: list[list[float]] = []
    top_ids: list[list[int]] = []
    if max_k > 0:
        values, ids = raw_logprobs.topk(min(max_k, raw_logprobs.shape[1]), dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    out: list[SampleLogprobs | None] = []
    for row, opt in enumerate(options):
        if opt.num_logprobs is None:
            out.append(None)
            continue
        k = opt.num_logprobs
        out.append(
            SampleLogprobs(
                logprob=sampled[row],
                top_token_ids=top_ids[row][:k] if k else [],
                top_logprobs=top_values[row][:k] if k else [],
            )
        )
    return out
