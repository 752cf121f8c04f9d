"""One draw per row from temperature-scaled logits, with min-p, top-k and top-p truncation.

Each row is sampled by inverting its CDF at the row's own uniform number ``u``: the token is the
first whose cumulative weight exceeds ``u * total``, with the tokens in probability order. Weights
are ``exp(logit - row_max)`` in float64, so a row's result depends only on its own logits and
``u``, never on which other rows share the batch.

Why probability order: logits computed along another path (a prompt's tail recomputed after a
prefix-cache hit, another batch shape) differ in float rounding, ~1e-5. Inverting a CDF built in
vocabulary order turns that into a different token whenever ``u * total`` lands near any of the
~V boundaries, each moved by the rounding of all the tokens before it (tests/worker/test_draw.py:
logits off by a relative 1e-6 changed 26 of 4,000 such draws; in CI a seeded request's 18th
token changed between a partial and a full prefix-cache hit). In probability order a boundary
moves only by the rounding of the mass beyond it, so the chance that rounding changes a draw is
about the rounding times the drawn token's rank (0 of the same 4,000).

Plain rows (no top-k / top-p) do not sort the vocabulary: the ``HEAD`` most probable tokens come
first, in order (``topk``). A draw that lands beyond them (``u * total`` past their mass: the
tail's probability) takes the tail's block of ``TAIL_BLOCK`` tokens where ``u * total`` falls
(a few dozen boundaries, not V), then the winner of an exponential race within it,
``argmax logit - log E`` over the block's tail tokens with ``E`` exponential numbers from a
counter-based generator seeded by ``u`` (numpy's PCG64, the same on every device): each wins with
probability its share of the block's mass, and rounding changes the winner only when two keys are
within it. The draw is exactly the distribution either way.

Truncation order (as vLLM V1): min-p (a ratio to the top probability), then top-k, then top-p
over the top-k renormalised distribution. Top-k/top-p need tokens in probability order; rather
than sorting the whole vocabulary per row, the rows are cut to their top ``C`` candidates with
``topk`` (``C`` = the largest k, or ``CANDIDATES`` for rows with only top-p), falling back to a
full sort only when the candidates do not cover a row's top-p mass. Masked candidates get
weight 0, so ``C`` never changes a row's token.
"""

from __future__ import annotations

import math

import numpy as np
import torch

CANDIDATES = 1024  # top-p-only rows: look at this many tokens before sorting the vocabulary
HEAD = 64  # plain rows: this many most probable tokens in probability order, then the tail
TAIL_BLOCK = 1024  # a tail draw: its block of this many tokens, then the race within the block
_TAIL_SEED = 0x5EED_7A11  # mixed into the tail race's seed (a function of the row's u)


def draw_tokens(
    logits: torch.Tensor,
    *,
    top_k: list[int],
    top_p: list[float],
    min_p: list[float],
    uniforms: list[float],
) -> torch.Tensor:
    """Token ids (int64 [R]) for rows of temperature-scaled ``logits`` [R, V]."""
    num_rows, vocab_size = logits.shape
    device = logits.device
    logits = _apply_min_p(logits, min_p)
    u = torch.tensor(uniforms, dtype=torch.float64, device=device)
    tokens = torch.empty(num_rows, dtype=torch.int64, device=device)
    truncated = [0 < k < vocab_size or p < 1.0 for k, p in zip(top_k, top_p, strict=True)]
    plain = [row for row, cut in enumerate(truncated) if not cut]
    if plain:
        tokens[plain] = _draw_plain(logits[plain], u[plain])
    cut_rows = [row for row, cut in enumerate(truncated) if cut]
    if cut_rows:
        tokens[cut_rows] = _draw_truncated(
            logits[cut_rows],
            [top_k[r] for r in cut_rows],
            [top_p[r] for r in cut_rows],
            u[cut_rows],
        )
    return tokens


def _apply_min_p(logits: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    if not any(p > 0.0 for p in min_p):
        return logits
    # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p); log(0) = -inf masks nothing.
    offset = torch.tensor(
        [math.log(p) if p > 0.0 else -math.inf for p in min_p],
        dtype=logits.dtype,
        device=logits.device,
    )
    threshold = logits.max(dim=-1, keepdim=True).values + offset.unsqueeze(1)
    return logits.masked_fill(logits < threshold, -math.inf)


def _weights(logits: torch.Tensor, row_max: torch.Tensor | None = None) -> torch.Tensor:
    if row_max is None:
        row_max = logits.max(dim=-1, keepdim=True).values
    return torch.exp((logits - row_max).double())


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    cdf = weights.cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return index.clamp_(max=weights.shape[1] - 1)


def _draw_plain(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF over the ``HEAD`` most probable tokens in order; past their mass, the tail's
    block and race (module docstring). The rows' total mass comes from float32 ``logsumexp``
    (a third of the time of float64 exponentials; a relative 1e-7 on where the tail starts);
    head and tail weights are float64."""
    head = min(HEAD, logits.shape[1])
    values, index = logits.topk(head, dim=-1)
    row_max = values[:, :1]
    head_cdf = _weights(values, row_max).cumsum(dim=-1)
    head_mass = head_cdf[:, -1]
    total = torch.exp((torch.logsumexp(logits, dim=-1) - row_max.squeeze(1)).double())
    target = u * torch.maximum(total, head_mass)
    positions = torch.searchsorted(head_cdf, target.unsqueeze(1), right=True).squeeze(1)
    tokens = index.gather(1, positions.clamp(max=head - 1).unsqueeze(1)).squeeze(1)
    tail_rows = (target >= head_mass).nonzero().flatten()
    if tail_rows.numel():
        tokens[tail_rows] = _tail_tokens(
            logits[tail_rows], index[tail_rows], row_max[tail_rows],
            target[tail_rows] - head_mass[tail_rows], u[tail_rows], tokens[tail_rows],
        )
    return tokens


def _tail_tokens(logits: torch.Tensor, head_index: torch.Tensor, row_max: torch.Tensor,
                 target: torch.Tensor, u: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Tail draws of the rows whose ``target`` (mass past their head) lies in the tail: the
    block of ``TAIL_BLOCK`` tokens (vocabulary order) where it falls in the tail's cumulative
    block masses, then an exponential race within it (``argmax logit - log E``, E from PCG64
    seeded by the row's ``u``) among the block's tail tokens; ``fallback`` where rounding of the
    masses sent a draw past a head that holds all the mass."""
    num_rows, vocab_size = logits.shape
    num_blocks = -(-vocab_size // TAIL_BLOCK)
    tail = _weights(logits, row_max).scatter_(1, head_index, 0.0)
    full = vocab_size // TAIL_BLOCK
    block_mass = tail[:, : full * TAIL_BLOCK].view(num_rows, full, TAIL_BLOCK).sum(dim=-1)
    if full < num_blocks:
        block_mass = torch.cat([block_mass, tail[:, full * TAIL_BLOCK :].sum(dim=-1, keepdim=True)], dim=1)
    block_cdf = block_mass.cumsum(dim=-1)
    blocks = torch.searchsorted(block_cdf, target.unsqueeze(1), right=True).squeeze(1)
    tokens = fallback.clone()
    for row, block in enumerate(blocks.clamp(max=num_blocks - 1).tolist()):
        start, stop = block * TAIL_BLOCK, min((block + 1) * TAIL_BLOCK, vocab_size)
        seed = (int(float(u[row]) * (1 << 53)) ^ _TAIL_SEED) & ((1 << 63) - 1)
        exponentials = np.random.Generator(np.random.PCG64(seed)).standard_exponential(stop - start)
        keys = logits[row, start:stop].double() - torch.from_numpy(np.log(exponentials)).to(logits.device)
        keys = keys.masked_fill(tail[row, start:stop] <= 0.0, -math.inf)
        winner = int(keys.argmax())
        if math.isfinite(float(keys[winner])):
            tokens[row] = start + winner
    return tokens


def _draw_truncated(
    logits: torch.Tensor, top_k: list[int], top_p: list[float], u: torch.Tensor
) -> torch.Tensor:
    vocab_size = logits.shape[1]
    device = logits.device
    k = [kk if 0 < kk < vocab_size else vocab_size for kk in top_k]
    row_max = logits.max(dim=-1, keepdim=True).values
    # A row without top-k takes top-p of the whole distribution: it needs the full mass.
    no_k = [row for row, kk in enumerate(k) if kk == vocab_size]
    full_mass = _weights(logits[no_k], row_max[no_k]).sum(dim=-1) if no_k else None
    top_p_t = torch.tensor(
        [p if p < 1.0 else math.inf for p in top_p], dtype=torch.float64, device=device
    )

    active_k = [kk for kk in k if kk < vocab_size]
    num_candidates = max(k) if not no_k else min(vocab_size, max([CANDIDATES, *active_k]))
    values, index = logits.topk(num_candidates, dim=-1)
    weights = _weights(values, row_max)
    if no_k and num_candidates < vocab_size and full_mass is not None:
        covered = weights[no_k].sum(dim=-1) >= top_p_t[no_k] * full_mass
        if not bool(covered.all()):
            values, index = logits.sort(dim=-1, descending=True)
            weights = _weights(values, row_max)
            num_candidates = vocab_size

    ranks = torch.arange(num_candidates, device=device).unsqueeze(0)
    k_t = torch.tensor(k, device=device).unsqueeze(1)
    weights = weights.masked_fill(ranks >= k_t, 0.0)
    if any(p < 1.0 for p in top_p):
        cdf = weights.cumsum(dim=-1)
        total = cdf[:, -1].clone()  # the top-k mass (top-p renormalises over it) ...
        if no_k and full_mass is not None:
            total[no_k] = full_mass  # ... or the whole distribution's
        mass_before = torch.cat([torch.zeros_like(cdf[:, :1]), cdf[:, :-1]], dim=-1)
        # Keep a token while the tokens ranked above it hold less than top_p (the first stays).
        weights = weights.masked_fill(mass_before >= (top_p_t * total).unsqueeze(1), 0.0)
    positions = _inverse_cdf(weights, u)
    return index.gather(1, positions.unsqueeze(1)).squeeze(1)
