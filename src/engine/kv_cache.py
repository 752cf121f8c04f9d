"""The paged KV-cache block pool: per-request block tables, prefix caching, LRU eviction.

The manager only does bookkeeping (block ids); workers hold the tensors. It never makes
policy: `allocate_slots` returns None when the pool is short and the scheduler decides whom to
preempt.

Block life cycle::

    state          ref_cnt  in free list  block_hash          how it gets there
    -------------  -------  ------------  ------------------  ----------------------------------
    free, empty    0        yes           None                start; evicted; freed un-cached
    free, cached   0        yes           set (in cache map)  freed after its K/V were cached
    in use         >= 1     no            None or set         allocate_slots / prefix-cache hit

The free list is ordered for LRU: allocation pops from the front (evicting the block's hash if
it had one); `free` appends a request's blocks tail-first, so the end of a prefix (the part
least likely to be shared) is evicted before its beginning. A prefix-cache hit on a free cached
block takes it out of the free list.

A full block's hash is `H(parent_hash, token_ids, extra)` (blake2b over a fixed encoding), so
equal hashes mean equal whole prefixes. Hashes are registered only for blocks whose tokens the
workers have computed (`cache_full_blocks`, called by the scheduler after a step finished), so
a hit never points at K/V that are not written yet.

Sliding window (issue 24): for a model whose every layer attends over the same window of W
tokens (Mistral with `sliding_window`), a query at position p reads keys from p - W + 1 on, so
a request's leading blocks that lie wholly before the window of its next position are given
back to the pool as it grows (`allocate_slots` does it first, for blocks a finished step wrote):
a long generation holds about W / block_size blocks. The request's table keeps their ids as
stale entries (positions stay aligned with the workers' tables; the attention never reads a
block before the window), counted by `num_released_blocks`. A released block keeps its prefix
hash, as a finished request's blocks do (vLLM's sliding-window manager keeps it too): it sits
in the free list, evictable, and a later request with the same prefix still hits it until it
is reused. Models with any global layer (Gemma) keep every block.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable

from shardline.engine.request import Request


def hash_block(parent_hash: bytes | None, token_ids: list[int], extra: bytes = b"") -> bytes:
    """The stable hash of one full block given the hash of the block before it."""
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(parent_hash or b"\x00" * 16)
    hasher.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    hasher.update(extra)
    return hasher.digest()


class KVCacheManager:
    """Block pool with reference counts and a hash -> block map for prefix caching."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        sliding_window: int | None = None,
    ):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_cnt = [0] * num_blocks
        self._block_hash: list[bytes | None] = [None] * num_blocks
        # OrderedDict as an O(1)-removable LRU queue of free block ids (values unused).
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._cached: dict[bytes, int] = {}
        self._tables: dict[str, list[int]] = {}
        # Per request: how many leading blocks of its table are known to hold a hash.
        self._hashed_prefix: dict[str, int] = {}
        self._init_window(sliding_window)

    # -- sizes ---------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks not held by any request (cached free blocks included: they are evictable)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by at least one request."""
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the pool held by requests, in [0, 1]."""
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks currently registered in the prefix-cache map (in use or free)."""
        return len(self._cached)

    def blocks_needed(self, num_tokens: int) -> int:
        """Number of blocks that hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    # -- protocol ------------------------------------------------------------------------------

    def get_block_ids(self, request_id: str) -> list[int]:
        """A copy of the request's block table (empty if it holds none)."""
        return list(self._tables.get(request_id, ()))

    def _update_hashes(self, request: Request, num_tokens: int) -> None:
        """Extend `request.block_hashes` to cover the full blocks among its first num_tokens."""
        hashes = request.block_hashes
        bs = self.block_size
        first, last = len(hashes), num_tokens // bs
        if first >= last:
            return  # the common case on a decode step: nothing new to hash
        # Only the tokens of the blocks still to hash, never the whole context.
        token_ids = request.token_ids_between(first * bs, last * bs)
        for index in range(last - first):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, token_ids[index * bs : (index + 1) * bs]))

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest cached full-block prefix of the request and how many tokens it covers.

        Never the whole token list: the last token must be computed to get logits. Nothing
        for a request that asks for its prompt's logprobs: every prompt position must be
        computed to score them (as vLLM).
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        usable_tokens = request.num_tokens - 1
        self._update_hashes(request, usable_tokens)
        blocks: list[int] = []
        for block_hash in request.block_hashes[: usable_tokens // self.block_size]:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks, len(blocks) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: list[int] | None = None
    ) -> list[int] | None:
        """Grow the request's table to hold its computed tokens, the prefix hit and new tokens.

        The table must end up covering `request.num_computed_tokens + len(new_computed_blocks)
        * block_size + num_new_tokens` tokens. Returns the block ids appended to the table
        (prefix-hit blocks first), or None, with no side effects, when the pool is short.
        """
        if self.sliding_window is not None:
            self._release_outside_window(request)
        table = self._tables.get(request.request_id, [])
        if not new_computed_blocks and table:
            # Decode fast path: most steps fit in the blocks the request already holds.
            needed = -(-(request.num_computed_tokens + num_new_tokens) // self.block_size)
            if needed <= len(table):
                return []
        computed = new_computed_blocks or []
        if computed and table:
            raise ValueError("new_computed_blocks is only valid for a request holding no blocks")
        total_tokens = (
            request.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        )
        num_fresh = self.blocks_needed(total_tokens) - len(table) - len(computed)
        # Hit blocks before the window are not taken (stale entries from the start).
        skip = self._hit_blocks_before_window(request, computed) if computed else 0
        # Touching a free cached block removes it from the free list too.
        num_revived = sum(1 for b in computed[skip:] if self._ref_cnt[b] == 0)
        if num_fresh > len(self._free) - num_revived:
            return None

        for block_id in computed[skip:]:
            if self._ref_cnt[block_id] == 0:
                del self._free[block_id]
            self._ref_cnt[block_id] += 1
        fresh = [self._pop_free_block() for _ in range(max(num_fresh, 0))]
        new_blocks = computed + fresh
        self._tables.setdefault(request.request_id, []).extend(new_blocks)
        if skip:
            self._released[request.request_id] = skip
        return new_blocks

    def _pop_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        old_hash = self._block_hash[block_id]
        if old_hash is not None:
            # Evicted: the cached content is about to be overwritten.
            del self._cached[old_hash]
            self._block_hash[block_id] = None
        self._ref_cnt[block_id] = 1
        return block_id

    def cache_full_blocks(self, request: Request, num_computed_tokens: int | None = None) -> None:
        """Register the hashes of the request's full blocks whose K/V are computed.

        Call after the step that computed them finished; `num_computed_tokens` (default
        `request.num_computed_tokens`) is how many tokens that step left with K/V, so a caller
        with a later step already scheduled can pass the finished step's count. A block whose
        content is already cached under another block id stays un-hashed (one block per hash).
        """
        if num_computed_tokens is None:
            num_computed_tokens = request.num_computed_tokens
        if self.sliding_window is not None:
            self._settled[request.request_id] = num_computed_tokens
        if not self.enable_prefix_caching:
            return
        table = self._tables.get(request.request_id)
        if not table:
            return
        # Blocks before `hashed` are known to hold a hash (a held block keeps it until
        # reset_prefix_cache), so each step only looks at blocks that became full since.
        # (released blocks may have been reused: never hashed from here)
        hashed = max(
            self._hashed_prefix.get(request.request_id, 0),
            self._released.get(request.request_id, 0),
        )
        if (hashed + 1) * self.block_size > num_computed_tokens:
            return  # the common decode step: no block became full
        num_computed_tokens = min(num_computed_tokens, request.num_tokens)
        num_full = min(num_computed_tokens // self.block_size, len(table))
        if hashed >= num_full:
            return
        self._update_hashes(request, num_full * self.block_size)
        contiguous = True
        for index in range(hashed, num_full):
            block_id = table[index]
            if self._block_hash[block_id] is None:
                block_hash = request.block_hashes[index]
                if block_hash in self._cached:
                    # Content cached under another block id: stays un-hashed, looked at again.
                    contiguous = False
                    continue
                self._block_hash[block_id] = block_hash
                self._cached[block_hash] = block_id
            if contiguous:
                hashed = index + 1
        self._hashed_prefix[request.request_id] = hashed

    def free(self, request_id: str) -> None:
        """Release the request's blocks; cached ones keep their hash until evicted."""
        table = self._tables.pop(request_id, None)
        self._hashed_prefix.pop(request_id, None)
        released = self._released.pop(request_id, 0)
        self._settled.pop(request_id, None)
        if not table:
            return
        for block_id in reversed(table[released:]):
            self._ref_cnt[block_id] -= 1
            if self._ref_cnt[block_id] == 0:
                self._free[block_id] = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (e.g. after the workers lost their K/V)."""
        for block_id in self._cached.values():
            self._block_hash[block_id] = None
        self._cached.clear()
        self._hashed_prefix.clear()

    # -- sliding window (issue 24) -------------------------------------------------------------

    def _init_window(self, sliding_window: int | None) -> None:
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        # Every layer's window in tokens (None: some layer reads the whole context).
        self.sliding_window = sliding_window
        # Tokens a request's next position may move back (rejected speculative tokens):
        # blocks are released for the window of num_computed_tokens - window_margin.
        self.window_margin = 0
        # Per request: leading table entries given back (stale ids), and tokens whose K/V a
        # finished step wrote (`cache_full_blocks`): only those blocks are released, so a
        # block is hashed (when it can be) before it goes back to the pool.
        self._released: dict[str, int] = {}
        self._settled: dict[str, int] = {}

    def num_released_blocks(self, request_id: str) -> int:
        """How many leading entries of the request's table were given back (stale ids)."""
        return self._released.get(request_id, 0)

    def held_block_ids(self, request_id: str) -> list[int]:
        """The blocks the request holds now: its table without the released entries."""
        return self._tables.get(request_id, [])[self.num_released_blocks(request_id) :]

    def _first_needed_position(self, request: Request) -> int:
        """The first key position the request's next queries may read."""
        assert self.sliding_window is not None
        return request.num_computed_tokens - self.window_margin - self.sliding_window + 1

    def _release_outside_window(self, request: Request) -> None:
        """Give back the request's leading blocks wholly before the window of its next
        position whose K/V a finished step wrote (a released block keeps its hash)."""
        req_id = request.request_id
        table = self._tables.get(req_id)
        if not table:
            return
        limit = min(self._first_needed_position(request), self._settled.get(req_id, 0))
        end = min(limit // self.block_size, len(table))
        start = self._released.get(req_id, 0)
        if end <= start:
            return
        for block_id in reversed(table[start:end]):  # tail first, as `free` (LRU order)
            self._ref_cnt[block_id] -= 1
            if self._ref_cnt[block_id] == 0:
                self._free[block_id] = None
        self._released[req_id] = end

    def blocks_to_hold(self, num_tokens: int, max_step_tokens: int) -> int:
        """The most blocks a request of `num_tokens` tokens holds at once when steps compute
        at most `max_step_tokens` of its tokens: all of them without a window; with one, its
        window (plus the margin), the step's tokens and one step in flight (whose blocks are
        released only once it finished), rounded to blocks."""
        needed = self.blocks_needed(num_tokens)
        if self.sliding_window is None:
            return needed
        reach = max(self.sliding_window - 1 + self.window_margin, max_step_tokens)
        return min(needed, (reach + max_step_tokens) // self.block_size + 2)

    def _hit_blocks_before_window(self, request: Request, computed: list[int]) -> int:
        """How many leading prefix-hit blocks lie wholly before the window of the first
        position after the hit (0 without a window); the hit counts as written K/V."""
        if self.sliding_window is None:
            return 0
        start = request.num_computed_tokens + len(computed) * self.block_size
        self._settled[request.request_id] = start
        first_needed = start - self.window_margin - self.sliding_window + 1
        return max(0, min(first_needed // self.block_size, len(computed)))

    def _check_window_invariants(self, live: dict[str, Request]) -> None:
        """8. Released entries exist only with a window and lie wholly before the window of
        the request's next position (the attention never needs them again)."""
        for req_id, released in self._released.items():
            if req_id not in self._tables or req_id not in live:
                raise AssertionError(
                    f"inv8: request {req_id} holds no table but has released blocks"
                )
            if self.sliding_window is None:
                raise AssertionError(f"inv8: request {req_id} released blocks without a window")
            first_needed = self._first_needed_position(live[req_id])
            if released * self.block_size > max(0, first_needed):
                raise AssertionError(
                    f"inv8: request {req_id} released {released} blocks but its window starts "
                    f"at position {first_needed}"
                )

    # -- speculative decoding (H14): rolling back rejected draft tokens' slots ------------------

    def trim_to(self, request_id: str, num_tokens: int) -> list[int]:
        """Drop the request's blocks past those `num_tokens` tokens need (the slots of rejected
        draft tokens); returns the ids dropped. Those blocks hold no computed token the request
        keeps, so none of them was hashed for the prefix cache by this request."""
        table = self._tables.get(request_id)
        keep = self.blocks_needed(num_tokens)
        if not table or len(table) <= keep:
            return []
        dropped = table[keep:]
        del table[keep:]
        for block_id in reversed(dropped):
            self._ref_cnt[block_id] -= 1
            if self._ref_cnt[block_id] == 0:
                self._free[block_id] = None
        return dropped

    # -- checking ------------------------------------------------------------------------------

    def check_invariants(self, live_requests: Iterable[Request]) -> None:
        """Raise AssertionError naming the first violated invariant (DESIGN.md section 5).

        `live_requests` are the requests that should hold blocks right now (running ones);
        a table held by any other request id counts as a leak. Read-only: it changes no state
        of the manager or of a request (hashes are recomputed from the tokens, never extended),
        so checking cannot mask a bug in the incremental hashing.
        """
        live = {r.request_id: r for r in live_requests}
        bs = self.block_size
        free_set = set(self._free)
        holders: dict[int, list[tuple[str, int]]] = {}
        for req_id, table in self._tables.items():
            released = self._released.get(req_id, 0)
            in_use = table[released:]
            if len(set(in_use)) != len(in_use):
                raise AssertionError(f"request {req_id} holds a block twice: {in_use}")
            for position, block_id in enumerate(in_use, start=released):
                holders.setdefault(block_id, []).append((req_id, position))

        # 1. free + in use = total: no block is both free and in a table, none is neither.
        both = sorted(free_set & holders.keys())
        if both:
            raise AssertionError(f"inv1: blocks {both} are in the free list and in a table")
        if len(free_set) + len(holders) != self.num_blocks:
            raise AssertionError(
                f"inv1: free {len(free_set)} + in use {len(holders)} != total {self.num_blocks}"
            )
        for block_id in range(self.num_blocks):
            refs = len(holders.get(block_id, ()))
            # 2. ref count = number of live tables holding the block.
            if self._ref_cnt[block_id] != refs:
                raise AssertionError(
                    f"inv2: block {block_id} has ref_cnt {self._ref_cnt[block_id]} "
                    f"but {refs} tables hold it"
                )
            # 3. free list <=> ref count 0.
            if (block_id in free_set) != (refs == 0):
                raise AssertionError(
                    f"inv3: block {block_id} ref_cnt {refs}, in free list: {block_id in free_set}"
                )
        # 4. cache map and block hashes agree both ways: every cached hash is held by exactly
        # one block, the one the map names, and every hash a block holds is in the map.
        hash_holders: dict[bytes, list[int]] = {}
        for block_id, held_hash in enumerate(self._block_hash):
            if held_hash is not None:
                hash_holders.setdefault(held_hash, []).append(block_id)
        for block_hash, blocks in hash_holders.items():
            if len(blocks) > 1:
                raise AssertionError(f"inv4: blocks {blocks} hold the same hash")
            if self._cached.get(block_hash) != blocks[0]:
                raise AssertionError(f"inv4: block {blocks[0]} holds a hash not in the cache map")
        for block_hash, block_id in self._cached.items():
            if hash_holders.get(block_hash) != [block_id]:
                raise AssertionError(f"inv4: cache map entry for block {block_id} is stale")
        # 5. table length = ceil(tokens with KV / block size); 6. nothing else holds blocks.
        for req_id, table in self._tables.items():
            request = live.get(req_id)
            if request is None:
                raise AssertionError(f"inv6: request {req_id} is not live but holds {table}")
            expected = self.blocks_needed(request.num_computed_tokens)
            if len(table) != expected:
                raise AssertionError(
                    f"inv5: request {req_id} has {request.num_computed_tokens} tokens with KV "
                    f"but {len(table)} blocks (expected {expected})"
                )
        self._check_window_invariants(live)
        # The incremental hash chain of every live request is the chain of its tokens,
        # recomputed here from scratch for all its full blocks.
        chains: dict[str, list[bytes]] = {}
        for req_id, request in live.items():
            tokens = request.all_token_ids
            chain = chains[req_id] = _hash_chain(tokens, bs)
            hashes = request.block_hashes
            if len(hashes) > len(chain):
                raise AssertionError(
                    f"inv7: request {req_id} has {len(hashes)} block hashes "
                    f"for {len(tokens)} tokens"
                )
            if hashes != chain[: len(hashes)]:
                raise AssertionError(f"inv7: block hashes of request {req_id} do not match its tokens")
        # 7. shared blocks sit at the same position behind equal token prefixes.
        for block_id, owners in holders.items():
            first_id, first_pos = owners[0]
            first_tokens = live[first_id].all_token_ids[: (first_pos + 1) * bs]
            for req_id, position in owners[1:]:
                tokens = live[req_id].all_token_ids[: (position + 1) * bs]
                if position != first_pos or tokens != first_tokens:
                    raise AssertionError(
                        f"inv7: block {block_id} shared by {first_id} and {req_id} "
                        "whose prefixes up to it differ"
                    )
            # A cached block's content must be what its hash says (guards a stale hash).
            held = self._block_hash[block_id]
            if held is not None:
                chain = chains[first_id]
                if len(chain) <= first_pos or chain[first_pos] != held:
                    raise AssertionError(f"inv7: block {block_id} hash does not match its tokens")


def _hash_chain(token_ids: list[int], block_size: int) -> list[bytes]:
    """The hashes of every full block of `token_ids`, computed from scratch."""
    chain: list[bytes] = []
    for index in range(len(token_ids) // block_size):
        block = token_ids[index * block_size : (index + 1) * block_size]
        chain.append(hash_block(chain[-1] if chain else None, block))
    return chain
