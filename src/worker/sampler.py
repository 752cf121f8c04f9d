"""Turn logits into tokens: penalties, temperature, top-k / top-p / min-p, seeds, logprobs.

Order of operations (as vLLM V1): logprobs are taken from the raw logits; then the token masks
of constrained requests (structured output: tokens the grammar forbids get -inf); then the logits
processors that can change an argmax, `logit_bias` (added) and `min_tokens` (the stop ids at
-inf until enough tokens were sampled); then repetition, frequency and presence penalties; then
temperature; then min-p, top-k and top-p (over the top-k renormalised distribution); then one
draw per row. A batch whose requests use none of these options costs nothing for them: the
all-greedy batch without masks still goes straight to the row argmax.

Prompt logprobs (`prompt_token_logprobs`) come from the logits of a prefill's positions, each
scoring the token after it, from the raw distribution as well.

Randomness is counter-based: the token at position ``n`` of a request is drawn with the uniform
number ``splitmix64(seed, n)``, inverted through that row's own CDF (``worker/draw.py``). A
seeded request therefore produces the same tokens whatever else is in the batch, on any device,
and also when its state is rebuilt (a worker restart, a request re-sent in full): nothing
depends on how many draws came before. Everything else is vectorised over the batch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shardline.model import cpu_ops
from shardline.transport.messages import SampleLogprobs, SamplingOptions
from shardline.worker.draw import draw_tokens

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


class _Edit:
    """Values to add to some logits of a row: ids and values as device tensors."""

    def __init__(self, ids: list[int], values: list[float], device: torch.device) -> None:
        self.ids = torch.tensor(ids, dtype=torch.int64, device=device)
        self.values = torch.tensor(values, dtype=torch.float32, device=device)
        self.max_id = max(ids)

    def within(self, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.max_id < vocab_size:
            return self.ids, self.values
        keep = self.ids < vocab_size  # e.g. an EOS id past a model's logits
        return self.ids[keep], self.values[keep]


class RequestSamplingState:
    """What the sampler keeps per request: options, seed, position and penalty bookkeeping.

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
        self.is_random = not is_greedy(options)
        self.needs_penalties = has_penalties(options)
        # logit_bias and min_tokens: (ids, values) on the device, built once per request.
        self.num_prompt_tokens = len(prompt_token_ids)
        self._bias: _Edit | None = None
        if options.logit_bias_ids:
            self._bias = _Edit(options.logit_bias_ids, options.logit_bias_values, device)
        self._stop_mask: _Edit | None = None
        if options.min_tokens > 0 and options.min_tokens_stop_ids:
            ids = options.min_tokens_stop_ids
            self._stop_mask = _Edit(ids, [-math.inf] * len(ids), device)
        self.has_processors = self._bias is not None or self._stop_mask is not None
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

    def logit_edits(self, vocab_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(ids, values) to add to this request's logits now: its logit_bias, and -inf on the
        min_tokens stop ids while fewer than `min_tokens` tokens were sampled. Ids outside the
        logits (a stop id past a padded vocabulary) are dropped."""
        edits = []
        if self._bias is not None:
            edits.append(self._bias.within(vocab_size))
        if (
            self._stop_mask is not None
            and self.num_tokens - self.num_prompt_tokens < self.options.min_tokens
        ):
            edits.append(self._stop_mask.within(vocab_size))
        return edits

    def next_uniform(self) -> float:
        """The uniform number in [0, 1) for the token at the current position."""
        return (_mix(self.seed, self.num_tokens) >> 10) / float(1 << 53)

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
class TokenMasks:
    """Token masks of some rows of a batch (structured output): `words[i]` is the int32 bitmask
    of row `rows[i]`, bit j of word w set = token 32 * w + j allowed (engine/structured_output.py)."""

    rows: list[int]
    words: np.ndarray  # int32 [len(rows), ceil(vocab / 32)]

    @classmethod
    def for_batch(cls, req_ids: Sequence[str], words: np.ndarray, batch_req_ids: Sequence[str]) -> TokenMasks:
        """The masks of a step (`req_ids[i]` has row `words[i]`) placed on the rows of the batch
        that samples (`batch_req_ids`). Every masked request must sample in the batch: the engine
        and the workers agree on who samples, and an unconstrained draw must never happen."""
        if words.ndim != 2 or words.dtype != np.int32 or words.shape[0] != len(req_ids):
            raise ValueError(f"token masks of shape {words.shape} ({words.dtype}) for {len(req_ids)} requests")
        position = {req_id: row for row, req_id in enumerate(batch_req_ids)}
        missing = [r for r in req_ids if r not in position]
        if missing:
            raise RuntimeError(f"token masks for requests that do not sample in this step: {missing[:4]}")
        return cls([position[r] for r in req_ids], words)

    def allowed(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """bool [len(rows), vocab_size]: True where the token may be sampled (ids past the
        masks' width are not allowed)."""
        bits = np.unpackbits(np.ascontiguousarray(self.words).view(np.uint8), axis=1, bitorder="little")
        if bits.shape[1] < vocab_size:
            bits = np.pad(bits, ((0, 0), (0, vocab_size - bits.shape[1])))
        return torch.from_numpy(np.ascontiguousarray(bits[:, :vocab_size])).to(device).bool()


def apply_token_masks(logits: torch.Tensor, masks: TokenMasks) -> torch.Tensor:
    """Logits with every token a row's mask forbids at -inf (in place)."""
    rows = torch.tensor(masks.rows, dtype=torch.int64, device=logits.device)
    allowed = masks.allowed(logits.shape[1], logits.device)
    logits[rows] = logits[rows].masked_fill(~allowed, -math.inf)
    return logits


@dataclass(frozen=True)
class SamplerOutput:
    """One sampled token per row, and the logprobs where a request asked for them."""

    token_ids: list[int]
    logprobs: list[SampleLogprobs | None] | None


def sample(logits: torch.Tensor, states: Sequence[RequestSamplingState],
           with_logprobs: bool = True, masks: TokenMasks | None = None) -> SamplerOutput:
    """Sample one token per row of ``logits`` [N, V] using each row's request state;
    ``with_logprobs=False`` skips the logprobs requests ask for (a rank that does not report);
    ``masks``: the token masks of constrained rows. ``logits`` may be changed in place
    (token masks, logit_bias, min_tokens)."""
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(
            f"logits shape {tuple(logits.shape)} does not match {len(states)} requests"
        )
    if not states:
        return SamplerOutput(token_ids=[], logprobs=None)
    logits = logits.float()
    options = [s.options for s in states]
    want_logprobs = with_logprobs and any(o.num_logprobs is not None for o in options)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    any_penalties = any(s.needs_penalties for s in states)
    any_processors = any(s.has_processors for s in states)
    if masks is not None and masks.rows:
        logits = apply_token_masks(logits, masks)
    if all(is_greedy(o) for o in options) and not (any_penalties or any_processors or raw_logprobs is not None):
        return SamplerOutput(token_ids=greedy_tokens(logits).tolist(), logprobs=None)

    if any_processors:
        logits = apply_logit_edits(logits, states)
    if any_penalties:
        logits = apply_penalties(logits, states)
    token_ids = _draw(logits, states)
    logprobs = (
        _gather_logprobs(raw_logprobs, token_ids, options) if raw_logprobs is not None else None
    )
    return SamplerOutput(token_ids=token_ids.tolist(), logprobs=logprobs)


def apply_logit_edits(logits: torch.Tensor, states: Sequence[RequestSamplingState]) -> torch.Tensor:
    """Logits with every row's logit_bias added and its min_tokens stop ids at -inf: one
    scatter-add over the batch (in place)."""
    vocab_size = logits.shape[1]
    rows: list[int] = []
    ids: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for row, state in enumerate(states):
        if not state.has_processors:
            continue
        for edit_ids, edit_values in state.logit_edits(vocab_size):
            rows.extend([row] * edit_ids.shape[0])
            ids.append(edit_ids)
            values.append(edit_values)
    if not rows:
        return logits
    # (The row index is built in Python: torch.repeat_interleave on CPU wakes OpenMP threads
    # that then spin against the fused argmax's threads: a 128 x 49152 batch with 16 biased
    # rows took 7.0 ms (median) instead of 1.1 ms on 2 cores; built here, 1.1 ms.)
    row_index = torch.tensor(rows, dtype=torch.int64).to(logits.device, non_blocking=True)
    # accumulate: a bias and a -inf on one id add up to -inf, in either order.
    logits.index_put_((row_index, torch.cat(ids)), torch.cat(values), accumulate=True)
    return logits


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


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(dim=-1)`: on CPU float32 the fused row argmax (model.cpu_ops), split over
    the worker's threads; the same indices as torch's, ties and NaN included."""
    if logits.stride(-1) == 1 and cpu_ops.enabled(logits):
        return cpu_ops.argmax_rows(logits)
    return logits.argmax(dim=-1)


def _draw(logits: torch.Tensor, states: Sequence[RequestSamplingState]) -> torch.Tensor:
    tokens = greedy_tokens(logits)
    random_rows = [i for i, s in enumerate(states) if s.is_random]
    if not random_rows:
        return tokens
    opts = [states[i].options for i in random_rows]
    temperature = torch.tensor(
        [o.temperature for o in opts], dtype=logits.dtype, device=logits.device
    )
    tokens[random_rows] = draw_tokens(
        logits[random_rows] / temperature.unsqueeze(1),
        top_k=[o.top_k for o in opts],
        top_p=[o.top_p for o in opts],
        min_p=[o.min_p for o in opts],
        uniforms=[states[i].next_uniform() for i in random_rows],
    )
    return tokens


def _gather_logprobs(
    raw_logprobs: torch.Tensor, token_ids: torch.Tensor, options: list[SamplingOptions]
) -> list[SampleLogprobs | None]:
    entries = _logprob_entries(raw_logprobs, token_ids, [o.num_logprobs or 0 for o in options])
    return [None if o.num_logprobs is None else e for o, e in zip(options, entries, strict=True)]


def _logprob_entries(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: list[int]) -> list[SampleLogprobs]:
    """Row i: the logprob of `token_ids[i]`, its rank, and the row's top `num_top[i]`."""
    chosen_column = logprobs.gather(1, token_ids.unsqueeze(1))
    chosen = chosen_column.squeeze(1).tolist()
    ranks = (logprobs >= chosen_column).sum(dim=1).tolist()
    max_k = max(num_top, default=0)
    top_values: list[list[float]] = []
    top_ids: list[list[int]] = []
    if max_k > 0:
        values, ids = logprobs.topk(min(max_k, logprobs.shape[1]), dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    return [
        SampleLogprobs(
            logprob=chosen[row],
            top_token_ids=top_ids[row][:k] if k else [],
            top_logprobs=top_values[row][:k] if k else [],
            rank=ranks[row],
        )
        for row, k in enumerate(num_top)
    ]


def prompt_token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> list[SampleLogprobs]:
    """For rows of `logits` [M, V] (positions of a prompt), the raw logprob of the token that
    follows each position (`token_ids` [M]) plus the row's top `num_top`."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return _logprob_entries(logprobs, token_ids, [num_top] * logits.shape[0])
