"""A model run over a paged KV cache of a chosen dtype, for the accuracy of 16-bit KV caches
(`EngineConfig.kv_cache_dtype`; docs/KV_CACHE.md).

`run_batch` computes every prompt in one batch the way the engine's steps do: a fresh prefill of
all but the last 5 prompt tokens, a 5-token chunk over that cached prefix (on CPU the kernel's
row-wise path), then one-token decode steps of every sequence together (the decode kernel, or on
a single-rank packed CPU model the C++ decoder loop), greedy. `compare` runs the float32 cache
first and then the other dtype twice: free-running (its own greedy tokens) and teacher-forced
with the float32 run's tokens, so that logits compare position by position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shardline.model.attention import AttentionMetadata
from shardline.worker.kv_cache import allocate_kv_cache

BLOCK_SIZE = 16
CHUNK = 5  # the last prompt tokens computed as a chunk over the cached prefix


@dataclass
class Run:
    tokens: list[list[int]]  # greedy tokens of each sequence
    logits: list[
        torch.Tensor
    ]  # [num_seqs, vocab] float32 per step (the chunk's last row, then decodes)


def _step(
    model: nn.Module,
    seqs: list[list[int]],
    done: list[int],
    new: list[int],
    tables: list[list[int]],
) -> torch.Tensor:
    """Compute tokens done[i]:done[i] + new[i] of every sequence; each one's last row's logits."""
    attn = AttentionMetadata.build(
        query_lens=new, context_lens=done, block_tables=tables, block_size=BLOCK_SIZE
    )
    ids = torch.tensor([t for s, d, n in zip(seqs, done, new, strict=True) for t in s[d : d + n]])
    positions = torch.cat([torch.arange(d, d + n) for d, n in zip(done, new, strict=True)])
    with torch.inference_mode():
        logits = model.compute_logits(model(ids, positions, attn))
    last = torch.tensor(attn.query_start_loc_cpu[1:]) - 1
    return logits[last].float()


def run_batch(
    model: nn.Module,
    prompts: list[list[int]],
    steps: int,
    kv_dtype: torch.dtype,
    forced: list[list[int]] | None = None,
) -> Run:
    """Greedy `steps` tokens for every prompt (or feed `forced`'s tokens: teacher forcing)."""
    longest = max(len(p) for p in prompts) + steps
    per_seq = -(-longest // BLOCK_SIZE)
    allocate_kv_cache(
        model,
        per_seq * len(prompts) + 1,
        block_size=BLOCK_SIZE,
        dtype=kv_dtype,
        device=torch.device("cpu"),
    )
    # Block ids interleaved over the sequences, so no table is contiguous.
    tables = [[1 + i + j * len(prompts) for j in range(per_seq)] for i in range(len(prompts))]
    seqs = [list(p) for p in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    logits = []
    _step(model, seqs, [0] * len(seqs), [len(p) - CHUNK for p in prompts], tables)
    done = [len(p) - CHUNK for p in prompts]
    new = [CHUNK] * len(seqs)
    for step in range(steps):
        out = _step(model, seqs, done, new, tables)
        logits.append(out)
        picks = out.argmax(dim=-1).tolist() if forced is None else [f[step] for f in forced]
        for i, pick in enumerate(picks):
            tokens[i].append(int(out[i].argmax()))
            seqs[i].append(pick)
            done[i] += new[i]
        new = [1] * len(seqs)
    return Run(tokens, logits)


@dataclass
class Accuracy:
    max_abs: float  # largest |logit - float32 cache's logit| over every position and sequence
    max_rel: float  # max_abs / largest |float32 cache's logit|
    argmax_agreement: float  # share of positions (teacher-forced) whose greedy pick is the same
    free_run_prefix: list[int]  # per sequence: tokens equal to the float32 cache's greedy run
    steps: int


def compare(
    model: nn.Module, prompts: list[list[int]], steps: int, kv_dtype: torch.dtype
) -> Accuracy:
    """`kv_dtype`'s cache against a float32 cache on the same model and prompts."""
    base = run_batch(model, prompts, steps, torch.float32)
    forced = run_batch(model, prompts, steps, kv_dtype, forced=base.tokens)
    free = run_batch(model, prompts, steps, kv_dtype)
    want = torch.stack(base.logits)
    got = torch.stack(forced.logits)
    max_abs = float((got - want).abs().max())
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    prefix = []
    for mine, theirs in zip(free.tokens, base.tokens, strict=True):
        same = next(
            (i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b), len(mine)
        )
        prefix.append(same)
    return Accuracy(max_abs, max_abs / float(want.abs().max()), agree, prefix, steps)
