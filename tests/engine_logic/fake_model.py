"""A deterministic fake "model" and a simulated worker for scheduler tests.

The simulated worker follows docs/INTERFACES.md section 1 to the letter: it keeps each
request's token list (prompt + every `new_token_ids`) and block table, writes a fake K/V value
for every computed position into a paged cache indexed by block id, and samples from what it
reads back from that cache. A K/V value chains the previous position's value with the token,
so a wrong block table, a stale prefix-cache hit, a block reused while still in use, or a
token sent twice or never changes the sampled tokens -- and the tests compare them with a
reference computed straight from the token list.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from shardline.engine.scheduler import SchedulerOutput

_MODULUS = (1 << 61) - 1
_SEED = 12345


def kv_value(previous: int, token_id: int) -> int:
    """The fake K/V of a position: depends on the whole prefix through `previous`."""
    return (previous * 1_000_003 + token_id + 1) % _MODULUS


def next_token(last_kv: int, vocab_size: int) -> int:
    """Greedy "logits": a function of the whole prefix."""
    return (last_kv >> 7) % vocab_size


def reference_generate(
    prompt: list[int],
    max_tokens: int,
    vocab_size: int,
    eos_token_ids: Collection[int],
    ignore_eos: bool,
    stop_token_ids: tuple[int, ...] = (),
) -> list[int]:
    """What the fake model generates for `prompt` with no batching, caching or preemption."""
    value = _SEED
    for token in prompt:
        value = kv_value(value, token)
    output: list[int] = []
    while len(output) < max_tokens:
        token = next_token(value, vocab_size)
        output.append(token)
        if (not ignore_eos and token in eos_token_ids) or token in stop_token_ids:
            break
        value = kv_value(value, token)
    return output


@dataclass
class _WorkerRequest:
    tokens: list[int]
    block_table: list[int]


@dataclass
class FakeWorker:
    """Executes SchedulerOutputs against a simulated paged KV cache."""

    num_blocks: int
    block_size: int
    vocab_size: int
    keep_sampled: bool = False  # append sampled tokens itself (SchedulerConfig.workers_keep_sampled)
    # A sliding-window model's window: computing position p also reads (and checks against the
    # values its tokens imply) every cached position from p - window + 1 on, so a block the
    # engine released while the window still covers it -- and another request overwrote --
    # is caught. None: only the previous position is read.
    window: int | None = None
    requests: dict[str, _WorkerRequest] = field(default_factory=dict)
    cache: dict[int, int] = field(default_factory=dict)  # slot -> fake K/V value

    def _slot(self, request: _WorkerRequest, position: int) -> int:
        block_index = position // self.block_size
        if block_index >= len(request.block_table):
            raise AssertionError(f"position {position} is beyond the block table")
        block_id = request.block_table[block_index]
        if not 0 <= block_id < self.num_blocks:
            raise AssertionError(f"block id {block_id} out of range")
        return block_id * self.block_size + position % self.block_size

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        """Run one step; return {req_id: sampled token} for the requests that sample."""
        for req_id in out.finished_ids:
            self.requests.pop(req_id, None)
        work: list[tuple[str, int, int]] = []
        for new in out.scheduled_new:
            if new.req_id in self.requests:
                raise AssertionError(f"{new.req_id} sent as new twice")
            self.requests[new.req_id] = _WorkerRequest(
                list(new.prompt_token_ids), list(new.block_ids)
            )
            work.append((new.req_id, new.num_computed_tokens, new.num_scheduled_tokens))
        for cached in out.scheduled_cached:
            state = self.requests.get(cached.req_id)
            if state is None:
                raise AssertionError(f"{cached.req_id} sent as cached but unknown to the worker")
            state.tokens.extend(cached.new_token_ids)
            if cached.resumed:
                state.block_table = list(cached.new_block_ids)
            else:
                state.block_table.extend(cached.new_block_ids)
            work.append((cached.req_id, cached.num_computed_tokens, cached.num_scheduled_tokens))

        # Write every scheduled position first (as a real forward does layer by layer), in
        # step order, then sample.
        sampled: dict[str, int] = {}
        for req_id, start, count in work:
            state = self.requests[req_id]
            end = start + count
            if end > len(state.tokens):
                raise AssertionError(f"{req_id}: computes up to {end}, knows {len(state.tokens)}")
            expected = self._window_values(state, start, end)
            for position in range(start, end):
                for key_pos in range(max(0, position - (self.window or 1) + 1), position):
                    value = self.cache.get(self._slot(state, key_pos))
                    if value != expected[key_pos]:
                        raise AssertionError(
                            f"{req_id}: K/V at {key_pos} (in the window of {position}) "
                            "was overwritten or never written"
                        )
                previous = _SEED
                if position > 0:
                    previous_slot = self._slot(state, position - 1)
                    if previous_slot not in self.cache:
                        raise AssertionError(f"{req_id}: reads unwritten K/V at {position - 1}")
                    previous = self.cache[previous_slot]
                self.cache[self._slot(state, position)] = kv_value(previous, state.tokens[position])
            if end == len(state.tokens):
                last = self.cache[self._slot(state, end - 1)]
                sampled[req_id] = next_token(last, self.vocab_size)
                if self.keep_sampled:
                    state.tokens.append(sampled[req_id])
        return sampled

    def _window_values(self, state: _WorkerRequest, start: int, end: int) -> dict[int, int]:
        """The K/V values the positions a window reads must hold (empty without a window)."""
        if self.window is None:
            return {}
        values: dict[int, int] = {}
        value = _SEED
        for position, token in enumerate(state.tokens[:end]):
            value = kv_value(value, token)
            if position >= start - self.window:
                values[position] = value
        return values
