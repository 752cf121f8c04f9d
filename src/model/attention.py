"""Paged attention over a flattened batch, in plain torch (SDPA and gathers), CPU and CUDA.

The batch is every scheduled token of every request, concatenated: request i owns query rows
`query_start_loc[i]:query_start_loc[i + 1]`. Before attending, the new K/V rows are written into
this layer's block tensor at `slot_mapping` (`block_id * block_size + offset`). Then:

* a request with no cached prefix (a fresh prefill) attends causally over its own new K/V; on
  CUDA, neighbouring fresh prefills share one SDPA call under a block-diagonal causal mask (a
  step of many short prompts is otherwise hundreds of tiny kernel launches per layer);
* a request with a cached prefix (prefix-cache hit, later prefill chunk) gathers its blocks and
  attends with the causal mask shifted by its context length (on CPU with at least
  `flash_prefix.MIN_CONTEXT` cached tokens: a mask-free pass over the context and a causal
  pass over the chunk, merged by log-sum-exp, so nothing of `[Lq, Lk]` is allocated);
* one-token requests (decode) are batched. With a CPU float32, float16 or bfloat16 cache they run
  the fused kernel of `model.paged_decode`, which reads each sequence's K/V straight from its
  blocks; otherwise (and with `SHARDLINE_CPU_ATTENTION=sdpa`, or where the kernel cannot be
  built) one gather of all their blocks into a padded tensor and one masked SDPA.

The cache's dtype may differ from the model's (`EngineConfig.kv_cache_dtype`, docs/KV_CACHE.md):
new K/V are stored rounded to nearest (float8 ones clamped to the type's finite range first, scale
1.0), and gathered K/V are converted to the query's dtype before SDPA.

A layer with a sliding window (Mistral, Gemma's local layers) or attention-logit soft-capping
(Gemma 2) attends request by request over the blocks its window reaches: blocks wholly before
the window are never read (the engine may have given them to another request), and the scores
are capped before the mask and softmax, as transformers' eager attention does. Decode queries
whose window still reaches the first token (all of them in a global soft-capped layer) are
batched: as a plain layer's without soft-capping, else one padded soft-capped softmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardline.model import cpu_ops, flash_prefix, paged_decode


@dataclass
class AttentionMetadata:
    """Where each request's queries sit in the flat batch and where its K/V live in the cache."""

    slot_mapping: torch.Tensor  # int64 [num_tokens]
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs], context length after this step
    context_lens: torch.Tensor  # int32 [num_seqs], tokens cached before this step
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks], padding = 0
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int
    # Per-step values the layers derive once and share (e.g. prefill masks), keyed by use.
    derived: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @classmethod
    def build(
        cls,
        *,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata for requests computing `query_lens[i]` tokens after `context_lens[i]`."""
        if not len(query_lens) == len(context_lens) == len(block_tables):
            raise ValueError("query_lens, context_lens and block_tables must have one entry per request")
        seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
        slots: list[int] = []
        for table, ctx_len, seq_len in zip(block_tables, context_lens, seq_lens, strict=True):
            if len(table) * block_size < seq_len:
                raise ValueError(
                    f"a block table of {len(table)} blocks of {block_size} cannot hold {seq_len} tokens"
                )
            slots.extend(table[p // block_size] * block_size + p % block_size
                         for p in range(ctx_len, seq_len))
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        width = max((len(t) for t in block_tables), default=0)
        padded = [list(t) + [0] * (width - len(t)) for t in block_tables]
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device).view(len(padded), width),
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            query_start_loc_cpu=starts,
            seq_lens_cpu=seq_lens,
            block_size=block_size,
        )


FLOAT8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2")
                      if hasattr(torch, name))


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` rounded to a KV cache's `dtype` (to nearest); for float8, clamped to its finite
    range first (scale 1.0, as vLLM's default), so a large value saturates instead of
    becoming NaN or infinity."""
    if x.dtype == dtype:
        return x
    if dtype in FLOAT8_DTYPES:
        limit = torch.finfo(dtype).max
        return x.clamp(-limit, limit).to(dtype)
    return x.to(dtype)


def _copyable(cache: torch.Tensor) -> torch.Tensor:
    """`cache` as bytes where it is float8 (index_copy_/index_select are not implemented for
    float8 on every device), else itself: the copy moves the same bytes either way."""
    return cache.view(torch.uint8) if cache.dtype in FLOAT8_DTYPES else cache


# Fresh prefills batched into one masked SDPA hold at most this many tokens per call (the
# boolean mask is tokens^2 bytes, the scores tokens^2 * heads floats).
FRESH_BATCH_MAX_TOKENS = 2048

# On CPU with the decode kernel, the queries of requests computing at most this many tokens in
# a step attend row by row in that kernel, every row as a one-token query over its own prefix
# of the cache (after the step's K/V are stored), all in one call per layer. Per-request SDPA
# calls cost ~130 us each on a 2-core VM (57 short prompts x 30 layers: 0.22 s per step); the
# row-wise reads grow with the square of the chunk, so longer chunks keep SDPA's flash kernel.
ROWWISE_MAX_QUERY = 128


def rowwise_metadata(attn: AttentionMetadata, max_query: int) -> tuple[Any, ...] | None:
    """(block_tables, seq_lens, query_start_loc, requests) of one virtual request per query row
    of the requests that compute 1..max_query tokens (listed in `requests`): row r of request
    i, at position p, attends over the first p + 1 tokens through i's block table. None when
    no request qualifies."""
    starts, seq_lens = attn.query_start_loc_cpu, attn.seq_lens_cpu
    chosen = [i for i in range(len(seq_lens)) if 0 < starts[i + 1] - starts[i] <= max_query]
    if not chosen:
        return None
    index = torch.tensor(chosen)
    query_lens = torch.tensor([starts[i + 1] - starts[i] for i in chosen])
    first_row = torch.tensor([starts[i] for i in chosen])
    first_len = torch.tensor([seq_lens[i] - (starts[i + 1] - starts[i]) + 1 for i in chosen])
    offset = torch.arange(int(query_lens.sum())) - torch.repeat_interleave(
        torch.cumsum(query_lens, 0) - query_lens, query_lens)
    rows = torch.repeat_interleave(first_row, query_lens) + offset
    lens = torch.repeat_interleave(first_len, query_lens) + offset
    tables = attn.block_tables[torch.repeat_interleave(index, query_lens)].contiguous()
    query_start_loc = torch.cat([rows, torch.tensor([starts[-1]])]).to(torch.int32)
    return tables, lens.to(torch.int32), query_start_loc, chosen


def step_rowwise_metadata(attn: AttentionMetadata) -> tuple[Any, ...] | None:
    """`rowwise_metadata(attn, ROWWISE_MAX_QUERY)`, built once per step and shared by every
    layer (and by the model's C++ layer loop)."""
    if "rowwise" not in attn.derived:
        attn.derived["rowwise"] = rowwise_metadata(attn, ROWWISE_MAX_QUERY)
    return attn.derived["rowwise"]


def _fresh_groups(starts: list[int], seq_lens: list[int]) -> list[list[int]]:
    """Runs of adjacent fresh-prefill requests (no cached context), each within the cap."""
    groups: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i, seq_len in enumerate(seq_lens):
        query_len = starts[i + 1] - starts[i]
        fresh = query_len > 0 and seq_len == query_len
        if current and (not fresh or tokens + query_len > FRESH_BATCH_MAX_TOKENS):
            groups.append(current)
            current, tokens = [], 0
        if fresh:
            current.append(i)
            tokens += query_len
    if current:
        groups.append(current)
    return groups


class Attention(nn.Module):
    """Attention for one decoder layer over its slice of the paged KV cache.

    `num_heads` / `num_kv_heads` are this rank's (after TP sharding or KV replication). The
    worker's runner assigns `kv_cache` (`[num_blocks, 2, block_size, num_kv_heads, head_dim]`);
    until then only fresh prefills (no cached context) can run, which is what profiling and
    one-shot scoring need.
    """

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int,
                 sliding_window: int | None = None, logit_softcap: float | None = None) -> None:
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window={sliding_window} must be >= 1")
        self.sliding_window = sliding_window
        self.logit_softcap = logit_softcap or None
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.kv_cache = torch.empty(0)
        # None: batch fresh prefills on CUDA only (on CPU the block-diagonal mask's wasted FLOPs
        # cost more than per-request calls); True/False forces it (tests).
        self.batch_fresh_prefills: bool | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn: AttentionMetadata) -> torch.Tensor:
        """q `[T, heads * head_dim]`, k/v `[T, kv_heads * head_dim]` -> `[T, heads * head_dim]`."""
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        has_cache = self.kv_cache.numel() > 0
        if has_cache:
            self._store_kv(k, v, attn)
        out = torch.empty_like(q)
        if self.sliding_window is not None or self.logit_softcap is not None:
            self._attend_windowed(q, k, v, out, attn, has_cache)
            return out.view(num_tokens, self.num_heads * self.head_dim)
        if has_cache and attn.max_query_len == 1 and num_tokens == attn.num_seqs:
            # Decode-only batch: no per-request Python work at all.
            self._attend_decode(q, out, attn, None)
            return out.view(num_tokens, self.num_heads * self.head_dim)
        starts, seq_lens = attn.query_start_loc_cpu, attn.seq_lens_cpu
        batched: set[int] = set()
        if has_cache and self._kernel(q):
            rowwise = step_rowwise_metadata(attn)
            if rowwise is not None:
                tables, lens, query_start_loc, chosen = rowwise
                paged_decode.paged_decode_attention(out, q, self.kv_cache, tables, lens,
                                                    query_start_loc, None, self.scale)
                batched.update(chosen)
        batch = self.batch_fresh_prefills
        if batch if batch is not None else q.is_cuda:
            for group in _fresh_groups(starts, seq_lens):
                if len(group) > 1:
                    self._attend_fresh_group(q, k, v, out, attn, group)
                    batched.update(group)
        decode_seqs: list[int] = []
        for i, seq_len in enumerate(seq_lens):
            start, end = starts[i], starts[i + 1]
            query_len = end - start
            context_len = seq_len - query_len
            if query_len == 0 or i in batched:
                continue
            if context_len == 0:
                out[start:end] = self._attend_fresh(q[start:end], k[start:end], v[start:end])
            elif not has_cache:
                raise RuntimeError(
                    "a request with cached context needs a KV cache, but this layer's kv_cache is unset"
                )
            elif query_len == 1:
                decode_seqs.append(i)
            else:
                out[start:end] = self._attend_with_prefix(q[start:end], attn, i, context_len)
        if decode_seqs:
            self._attend_decode(q, out, attn, decode_seqs)
        return out.view(num_tokens, self.num_heads * self.head_dim)

    def _kernel(self, q: torch.Tensor) -> bool:
        """Whether the CPU decode kernel attends: it reads a float32/float16/bfloat16 cache for
        float32 queries (a bfloat16 model on the CPU keeps gather + SDPA)."""
        return q.dtype == torch.float32 and paged_decode.kernel_enabled(self.kv_cache.device,
                                                                         self.kv_cache.dtype)

    def _store_kv(self, k: torch.Tensor, v: torch.Tensor, attn: AttentionMetadata) -> None:
        """Write the new K/V rows at their slots: on CPU the fused `cpu_ops.store_kv`;
        otherwise two `index_copy_`s into the cache viewed as rows
        `[num_blocks * 2 * block_size, kv_heads * head_dim]` (block b's K at row offset
        `2b * block_size`, its V one block later), row indices derived once per step. Rows are
        converted to the cache's dtype first (`to_cache_dtype`)."""
        if cpu_ops.store_kv_enabled(self.kv_cache, k):
            cpu_ops.store_kv(k.view(k.shape[0], -1), v.view(v.shape[0], -1), self.kv_cache,
                             attn.slot_mapping)
            return
        block_size = self.kv_cache.shape[2]
        key = ("kv_rows", block_size)
        rows = attn.derived.get(key)
        if rows is None:
            slots = attn.slot_mapping
            k_rows = torch.div(slots, block_size, rounding_mode="floor") * (2 * block_size) + slots % block_size
            rows = attn.derived[key] = (k_rows, k_rows + block_size)
        flat = _copyable(self.kv_cache).view(-1, self.num_kv_heads * self.head_dim)
        for index, new in zip(rows, (k, v), strict=True):
            flat.index_copy_(0, index, _copyable(to_cache_dtype(new.reshape(new.shape[0], -1),
                                                                self.kv_cache.dtype)))

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        # q [..., heads, Lq, D], k/v [..., kv_heads, Lk, D]. Batched (4-D) inputs: with 3-D
        # ones torch's CPU dispatch skips its flash kernel for the math path (3-4x slower).
        unbatched = q.dim() == 3
        if unbatched:
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.squeeze(0) if unbatched else out

    def _attend_fresh(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self._sdpa(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), None, True)
        return out.transpose(0, 1)

    def _attend_fresh_group(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                            attn: AttentionMetadata, group: list[int]) -> None:
        """Adjacent fresh prefills `group` in one SDPA: each token sees its own request's earlier
        tokens only (block-diagonal causal mask, built once per step and shared by the layers)."""
        starts = attn.query_start_loc_cpu
        first, last = starts[group[0]], starts[group[-1] + 1]
        key = ("fresh", first, last)
        mask = attn.derived.get(key)
        if mask is None:
            lengths = torch.tensor([starts[i + 1] - starts[i] for i in group], device=q.device)
            segment = torch.repeat_interleave(torch.arange(len(group), device=q.device), lengths)
            index = torch.arange(last - first, device=q.device)
            mask = (segment[:, None] == segment[None, :]) & (index[None, :] <= index[:, None])
            attn.derived[key] = mask
        rows = slice(first, last)
        result = self._sdpa(q[rows].transpose(0, 1), k[rows].transpose(0, 1), v[rows].transpose(0, 1), mask, False)
        out[rows] = result.transpose(0, 1)

    def _gather(self, block_ids: torch.Tensor, length: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V `[..., kv_heads, length, D]` in `dtype` (the query's) of the blocks
        `block_ids` (`[..., num_blocks]`).

        The cache viewed as rows `[num_blocks * 2, block_size * kv_heads * D]` holds block b's
        K at row 2b and V at row 2b + 1, so each is one contiguous row gather (a memcpy per
        block); what follows is views only, and a conversion when the cache's dtype is not
        `dtype` (a 16-bit or float8 cache, `EngineConfig.kv_cache_dtype`).
        """
        num_blocks, _, block_size = self.kv_cache.shape[:3]
        rows = _copyable(self.kv_cache).view(num_blocks * 2, -1)
        lead = block_ids.shape[:-1]
        flat_ids = block_ids.reshape(-1) * 2
        out = []
        for which in (0, 1):
            part = rows.index_select(0, flat_ids + which).view(self.kv_cache.dtype)
            part = part.view(*lead, block_ids.shape[-1] * block_size, self.num_kv_heads, self.head_dim)
            part = part[..., :length, :, :]
            if part.dtype != dtype:
                part = part.to(dtype)
            out.append(part.transpose(-3, -2))
        return out[0], out[1]

    def _attend_with_prefix(self, q: torch.Tensor, attn: AttentionMetadata, seq: int,
                            context_len: int) -> torch.Tensor:
        seq_len = attn.seq_lens_cpu[seq]
        block_size = self.kv_cache.shape[2]
        num_blocks = -(-seq_len // block_size)
        key, value = self._gather(attn.block_tables[seq, :num_blocks].long(), seq_len, q.dtype)
        split = flash_prefix.attend(q, key, value, context_len, self.scale)
        if split is not None:  # long context on CPU: no [Lq, Lk] mask (model/flash_prefix.py)
            return split
        query_pos = torch.arange(context_len, seq_len, device=q.device)
        key_pos = torch.arange(seq_len, device=q.device)
        mask = key_pos[None, :] <= query_pos[:, None]  # [Lq, Lk], True = may attend
        return self._sdpa(q.transpose(0, 1), key, value, mask, False).transpose(0, 1)

    def window_start(self, first_query_pos: int) -> int:
        """The first key position a query at `first_query_pos` (or later) may see."""
        if self.sliding_window is None:
            return 0
        return max(0, first_query_pos - self.sliding_window + 1)

    def _attend_windowed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         attn: AttentionMetadata, has_cache: bool) -> None:
        """Each request over the keys its window reaches (from the cache's blocks, those before
        the window never gathered), scores soft-capped when the layer caps them."""
        starts, seq_lens = attn.query_start_loc_cpu, attn.seq_lens_cpu
        # One-token queries whose window still reaches their first token (every one, in a
        # global soft-capped layer) attend in one batch: a plain layer's decode path (the fused
        # kernel on CPU), or one padded soft-capped softmax; the rest request by request.
        window = self.sliding_window
        decode_seqs: list[int] = []
        for i, seq_len in enumerate(seq_lens):
            start, end = starts[i], starts[i + 1]
            if end == start:
                continue
            if has_cache and end - start == 1 and (window is None or seq_len <= window):
                decode_seqs.append(i)
                continue
            context_len = seq_len - (end - start)
            if has_cache:
                block_size = self.kv_cache.shape[2]
                first_block = self.window_start(context_len) // block_size
                num_blocks = -(-seq_len // block_size)
                key, value = self._gather(attn.block_tables[i, first_block:num_blocks].long(),
                                          seq_len - first_block * block_size, q.dtype)
                key_start = first_block * block_size
            elif context_len == 0:
                key, value = k[start:end].transpose(0, 1), v[start:end].transpose(0, 1)
                key_start = 0
            else:
                raise RuntimeError(
                    "a request with cached context needs a KV cache, but this layer's kv_cache is unset"
                )
            query_pos = torch.arange(context_len, seq_len, device=q.device)
            key_pos = torch.arange(key_start, seq_len, device=q.device)
            mask = key_pos[None, :] <= query_pos[:, None]
            if self.sliding_window is not None:
                mask &= key_pos[None, :] > query_pos[:, None] - self.sliding_window
            out[start:end] = self._masked_attention(q[start:end].transpose(0, 1), key, value,
                                                    mask).transpose(0, 1)
        if decode_seqs and self.logit_softcap is None:
            self._attend_decode(q, out, attn, decode_seqs)
        elif decode_seqs:
            self._attend_decode_capped(q, out, attn, decode_seqs)

    def _attend_decode_capped(self, q: torch.Tensor, out: torch.Tensor, attn: AttentionMetadata,
                              seqs: list[int]) -> None:
        """One-token queries of `seqs` whose keys are all in reach: their blocks gathered into a
        padded `[S, kv_heads, L, D]`, scores soft-capped and masked to each length, one softmax."""
        block_size = self.kv_cache.shape[2]
        rows = torch.tensor([attn.query_start_loc_cpu[i] for i in seqs], device=q.device)
        index = torch.tensor(seqs, device=q.device)
        max_len = max(attn.seq_lens_cpu[i] for i in seqs)
        tables = attn.block_tables[index, : -(-max_len // block_size)].long()
        key, value = self._gather(tables, max_len, q.dtype)  # [S, kvh, L, D]
        group = self.num_heads // self.num_kv_heads
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
        query = q[rows].unsqueeze(2)  # [S, heads, 1, D]
        scores = torch.matmul(query, key.transpose(-1, -2)) * self.scale
        scores = torch.tanh(scores / self.logit_softcap) * self.logit_softcap  # type: ignore[operator]
        key_pos = torch.arange(max_len, device=q.device)
        valid = (key_pos[None, :] < attn.seq_lens[index][:, None].long())[:, None, None, :]
        probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1, dtype=torch.float32)
        out[rows] = torch.matmul(probs.to(q.dtype), value).squeeze(2)

    def _masked_attention(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
        """q `[heads, Lq, D]`, key/value `[kv_heads, Lk, D]`, mask `[Lq, Lk]` (True = attend)."""
        if self.logit_softcap is None:
            return self._sdpa(q, key, value, mask, False)
        group = self.num_heads // self.num_kv_heads
        key = key.repeat_interleave(group, dim=0)
        value = value.repeat_interleave(group, dim=0)
        scores = torch.matmul(q, key.transpose(-1, -2)) * self.scale
        scores = torch.tanh(scores / self.logit_softcap) * self.logit_softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, value)

    def _attend_decode(self, q: torch.Tensor, out: torch.Tensor, attn: AttentionMetadata,
                       seqs: list[int] | None) -> None:
        """One-token queries of `seqs` (None: every request, one token each) in one call."""
        if self._kernel(q):
            seq_ids = None if seqs is None else torch.tensor(seqs, dtype=torch.int64)
            paged_decode.paged_decode_attention(out, q, self.kv_cache, attn.block_tables,
                                                attn.seq_lens, attn.query_start_loc, seq_ids,
                                                self.scale)
        else:
            self._attend_decode_sdpa(q, out, attn, seqs)

    def _attend_decode_sdpa(self, q: torch.Tensor, out: torch.Tensor, attn: AttentionMetadata,
                            seqs: list[int] | None) -> None:
        """Gather every sequence's blocks into a padded `[S, kv_heads, L, D]`, one masked SDPA."""
        block_size = self.kv_cache.shape[2]
        if seqs is None:
            seq_lens = attn.seq_lens
            max_len = attn.max_seq_len
            tables = attn.block_tables
        else:
            rows = torch.tensor([attn.query_start_loc_cpu[i] for i in seqs], device=q.device)
            index = torch.tensor(seqs, device=q.device)
            seq_lens = attn.seq_lens[index]
            max_len = max(attn.seq_lens_cpu[i] for i in seqs)
            tables = attn.block_tables[index]
        num_blocks = -(-max_len // block_size)
        key, value = self._gather(tables[:, :num_blocks].long(), max_len, q.dtype)  # [S, kvh, L, D]
        key_pos = torch.arange(max_len, device=q.device)
        mask = (key_pos[None, :] < seq_lens[:, None].long())[:, None, None, :]  # [S, 1, 1, L]
        query = (q if seqs is None else q[rows]).unsqueeze(2)  # [S, heads, 1, D]
        result = self._sdpa(query, key, value, mask, False).squeeze(2)
        if seqs is None:
            out.copy_(result)
        else:
            out[rows] = result
