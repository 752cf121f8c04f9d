"""ModelRunner: keep per-request state, turn each ExecuteStep into one forward, sample.

One step, as the engine sends it (docs/INTERFACES.md section 1):

    1) drop ``finished_ids``
    2) add ``new_requests``; apply ``cached_requests`` diffs (new tokens, new blocks, resumed)
    3) flatten the scheduled chunks into tensors and run ``model.forward``
    4) on the last pipeline stage compute logits for the requests that sample (every TP rank:
       the vocab gather is a collective); the output rank samples and returns a StepResult;
       constrained requests (``bitmask_req_ids``) sample under their token masks on every
       sampling rank
    5) for requests that asked for prompt logprobs, also the logits of their prompt positions
       in this step's chunk (each scores the prompt token after it; the last position of a
       chunk scores the first token of the next chunk); the output rank reports them

Step order is ``new_requests`` then ``cached_requests``, as listed in the message; the
StepResult lists the sampling requests in that order.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from typing import Any

import torch
from torch import nn

from shardline.model.paged_decode import kernel_enabled
from shardline.model.parallel_context import ParallelContext
from shardline.transport.messages import (
    CachedRequest,
    ExecuteStep,
    NewRequest,
    PromptLogprobs,
    SampleLogprobs,
    StepResult,
    decode,
    encode,
)
from shardline.worker.inputs import (
    BlockTable,
    RequestState,
    ScheduledChunk,
    StepInputs,
    build_step_inputs,
)
from shardline.worker.kv_cache import allocate_kv_cache
from shardline.worker.pipeline import PipelineLink
from shardline.worker.sampler import (
    RequestSamplingState,
    TokenMasks,
    derive_seed,
    prompt_token_logprobs,
    sample,
)
from shardline.worker.speculative import verify

logger = logging.getLogger(__name__)

PROMPT_LOGITS_ROWS = 256
"""Prompt positions whose logits are computed at once (bounds the [rows, vocab] logits)."""


class _RunnerTimer:
    """Per-phase step timers in thread CPU time, on with SHARDLINE_STEP_TIMING_FILE (see
    engine.step_timer).

    Message decode/encode happen in the worker's channels, outside the runner; they are timed
    here on the side by decoding the step's bytes and encoding the result once more.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.totals: dict[str, float] = {}
        self.steps = 0
        self._last = time.thread_time()

    @classmethod
    def from_env(cls, name: str) -> _RunnerTimer | None:
        prefix = os.environ.get("SHARDLINE_STEP_TIMING_FILE")
        return cls(f"{prefix}.{name}") if prefix else None

    def lap(self, name: str) -> None:
        now = time.thread_time()
        self._add(name, now - self._last)
        self._last = now

    def _add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    def measure_wire(self, step: ExecuteStep) -> None:
        data = encode(step)
        start = time.thread_time()
        decode(data)
        self._add("(side) decode ExecuteStep", time.thread_time() - start)
        self._last = time.thread_time()

    def step_done(self, result: StepResult | None) -> None:
        if result is not None:
            start = time.thread_time()
            encode(result)
            self._add("(side) encode StepResult", time.thread_time() - start)
        self.steps += 1
        if self.steps % 32 == 0:
            with open(self.path, "w", encoding="utf-8") as handle:
                json.dump({**self.totals, "_steps": self.steps}, handle)
        self._last = time.thread_time()


class ModelRunner:
    """Runs steps on one rank's model shard with its paged KV cache."""

    def __init__(
        self,
        model: nn.Module,
        parallel_context: ParallelContext,
        *,
        block_size: int,
        dtype: torch.dtype,
        seed: int = 0,
        hidden_size: int | None = None,
        keep_sampled_tokens: bool = False,
    ) -> None:
        self.model: Any = model  # duck-typed model contract (docs/INTERFACES.md section 3)
        self.parallel_context = parallel_context
        self.device = parallel_context.device
        self.block_size = block_size
        self.dtype = dtype
        self.seed = seed
        pc = parallel_context
        self.is_last_stage = pc.pp_rank == pc.pp_size - 1
        self.is_output_rank = self.is_last_stage and pc.tp_rank == 0
        if keep_sampled_tokens and pc.pp_size != 1:
            raise ValueError("a worker group with pipeline stages cannot keep its sampled tokens "
                             "(only the last stage sees the logits)")
        # Append each sampled token to the request's state here, so the engine need not send it
        # back (and can schedule the next step before it knows the token: async scheduling).
        # Then every TP rank samples: all hold the same gathered logits and the same seeded
        # sampler state, so all draw the same tokens; the output rank alone reports them.
        self.keep_sampled_tokens = keep_sampled_tokens
        self.samples = self.is_output_rank or (keep_sampled_tokens and self.is_last_stage)
        self.requests: dict[str, RequestState] = {}
        # Speculative decoding: requests whose last step verified draft tokens; their next diff
        # may come with a shorter block table (the engine freed blocks of rejected drafts).
        self._spec_rolled: set[str] = set()
        # Requests whose prompt positions still need scoring (prompt_logprobs): a step without
        # any costs one truth test.
        self._prompt_logprobs_pending: set[str] = set()
        self._timer = _RunnerTimer.from_env(f"worker-pp{pc.pp_rank}-tp{pc.tp_rank}")
        self.num_kv_blocks = 0
        self.pipeline: PipelineLink | None = None
        if pc.pp_size > 1:
            if hidden_size is None:
                raise ValueError("pipeline parallelism needs the model's hidden_size")
            self.pipeline = PipelineLink(pc, hidden_size=hidden_size, dtype=dtype)

    # ----------------------------------------------------------------- set-up
    def initialize_kv_cache(self, num_blocks: int, scratch_blocks: int = 0, populate: bool = True,
                            kv_dtype: torch.dtype | None = None) -> int:
        """Allocate ``num_blocks`` blocks in every local attention layer, plus ``scratch_blocks``
        after them that the engine never hands out (ids ``num_blocks``...; CUDA graphs pad
        into one); returns bytes. ``populate=False`` leaves committing CPU pages to the caller
        (`worker.kv_cache.commit_kv_cache`). ``kv_dtype``: the cache's dtype (default the model's)."""
        self.num_kv_blocks = num_blocks
        kv_dtype = kv_dtype or self.dtype
        allocated = allocate_kv_cache(
            self.model, num_blocks + scratch_blocks, block_size=self.block_size, dtype=kv_dtype,
            device=self.device, populate=populate,
        )
        # Build or load the CPU decode-attention kernel now, not in the first request's step.
        kernel_enabled(self.device, kv_dtype)
        # The last set-up step: what exists now (torch, the model) lives as long as the rank,
        # so full collections during serving need not scan it (as in the engine's core).
        gc.freeze()
        return allocated

    # ----------------------------------------------------------------- steps
    def execute(self, step: ExecuteStep) -> StepResult | None:
        """Run one step; the output rank returns its StepResult, the other ranks None."""
        if self._timer is None:
            return self._execute(step, None)
        self._timer.measure_wire(step)
        result = self._execute(step, self._timer)
        self._timer.step_done(result)
        return result

    def _execute(self, step: ExecuteStep, timer: _RunnerTimer | None) -> StepResult | None:
        # 1) drop finished requests
        for req_id in step.finished_ids:
            self.requests.pop(req_id, None)
            self._prompt_logprobs_pending.discard(req_id)
        # 2) apply the diffs
        if self._spec_rolled:
            self._roll_back_tables(step)
        chunks = [self._add_request(new) for new in step.new_requests]
        chunks += [self._update_request(cached) for cached in step.cached_requests]
        if not chunks:
            return self._result(step.step_id, [], None) if self.is_output_rank else None
        if step.spec_req_ids:
            return self._execute_speculative(step, chunks, timer)
        if timer:
            timer.lap("apply step diffs")
        # 3) forward
        inputs = build_step_inputs(chunks, block_size=self.block_size, device=self.device)
        if timer:
            timer.lap("prepare inputs")
        with torch.inference_mode():
            hidden = self._forward(inputs)
            for chunk in chunks:
                chunk.state.num_computed_tokens = chunk.num_computed + chunk.num_scheduled
            if not self.is_last_stage:
                return None
            # 5) (before sampling, in the same order on every TP rank: logits are collective)
            prompt_logprobs: list[PromptLogprobs] = []
            if self._prompt_logprobs_pending:
                prompt_logprobs = self._prompt_logprobs(chunks, inputs.attn.query_start_loc_cpu, hidden)
            # 4) logits and sampling
            if not inputs.sample_states:
                return self._result(step.step_id, [], None, None, prompt_logprobs) if self.is_output_rank else None
            logits = self.model.compute_logits(hidden[inputs.sample_indices])
            if timer:
                timer.lap("forward + logits")
            if not self.samples:
                return None
            states = inputs.sample_states
            sampling = [s.sampling for s in states]
            if any(s is None for s in sampling):  # impossible on a sampling rank; fail loudly
                raise RuntimeError("a sampling request has no sampler state on a sampling rank")
            masks = None
            if step.bitmask_req_ids:  # structured output: the same masks on every sampling rank
                if step.bitmask is None:
                    raise ValueError("ExecuteStep lists bitmask_req_ids without a bitmask")
                masks = TokenMasks.for_batch(step.bitmask_req_ids, step.bitmask.to_numpy(), [s.req_id for s in states])
            out = sample(logits, [s for s in sampling if s is not None], with_logprobs=self.is_output_rank,
                         masks=masks)
            if self.keep_sampled_tokens:
                for state, token_id in zip(states, out.token_ids, strict=True):
                    state.append_tokens((token_id,))
        if timer:
            timer.lap("sample")
        if not self.is_output_rank:
            return None
        return self._result(step.step_id, [s.req_id for s in states], out.token_ids, out.logprobs, prompt_logprobs)

    # ----------------------------------------------------------------- speculative decoding
    def _roll_back_tables(self, step: ExecuteStep) -> None:
        """Shorten the block tables of requests whose drafts were rejected to the blocks their
        computed tokens use (the engine freed the rest: `KVCacheManager.trim_to`)."""
        rolled = self._spec_rolled
        for req_id in step.finished_ids:
            rolled.discard(req_id)
        for cached in step.cached_requests:
            if cached.req_id not in rolled:
                continue
            rolled.discard(cached.req_id)
            state = self.requests.get(cached.req_id)
            if state is None or cached.resumed:
                continue
            keep = -(-cached.num_computed_tokens // self.block_size)
            state.block_table.truncate(keep)

    def _execute_speculative(
        self, step: ExecuteStep, chunks: list[ScheduledChunk], timer: _RunnerTimer | None
    ) -> StepResult | None:
        """A step whose chunks include draft tokens (``step.spec_req_ids``): one forward over
        every chunk (a speculating request's query is its last token and its drafts), logits
        of each draft position plus the last, then verification (worker/speculative.py)."""
        drafts_by_id = dict(zip(step.spec_req_ids, step.spec_token_ids, strict=True))
        self._spec_rolled.update(drafts_by_id)
        extended = []
        for chunk in chunks:
            chunk_drafts = drafts_by_id.get(chunk.state.req_id)
            if chunk_drafts:
                chunk.state.token_ids.extend(chunk_drafts)  # for this step's inputs only
                extended.append((chunk.state, len(chunk_drafts)))
        try:
            inputs = build_step_inputs(chunks, block_size=self.block_size, device=self.device)
            with torch.inference_mode():
                hidden = self._forward(inputs)
        finally:
            for state, count in extended:
                del state.token_ids[-count:]
        for chunk in chunks:
            chunk.state.num_computed_tokens = chunk.num_computed + chunk.num_scheduled
        if timer:
            timer.lap("forward (speculative)")
        if not self.is_last_stage:
            return None
        prompt_logprobs: list[PromptLogprobs] = []
        if self._prompt_logprobs_pending:
            with torch.inference_mode():
                prompt_logprobs = self._prompt_logprobs(chunks, inputs.attn.query_start_loc_cpu, hidden)
        states = inputs.sample_states
        drafts = [drafts_by_id.get(s.req_id, []) for s in states]
        rows = [r for last, d in zip(inputs.sample_indices.tolist(), drafts, strict=True)
                for r in range(last - len(d), last + 1)]
        with torch.inference_mode():
            logits = self.model.compute_logits(hidden[torch.tensor(rows, dtype=torch.int64, device=hidden.device)])
            if not self.samples:
                return None
            sampling = [s.sampling for s in states]
            if any(s is None for s in sampling):
                raise RuntimeError("a sampling request has no sampler state on a sampling rank")
            masks = None
            if step.bitmask_req_ids:
                if step.bitmask is None:
                    raise ValueError("ExecuteStep lists bitmask_req_ids without a bitmask")
                masks = (step.bitmask_req_ids, step.bitmask.to_numpy())
            out = verify(logits, [s for s in sampling if s is not None], drafts, [s.req_id for s in states],
                         with_logprobs=self.is_output_rank, masks=masks)
        if self.keep_sampled_tokens:
            for state, token_ids in zip(states, out.token_ids, strict=True):
                state.append_tokens(token_ids)
        if timer:
            timer.lap("verify")
        if not self.is_output_rank:
            return None
        logprobs = None
        spec_logprobs: list[list[SampleLogprobs]] = []
        if out.logprobs is not None:
            logprobs = [None if e is None else e[-1] for e in out.logprobs]
            spec_logprobs = [[] if e is None else e[:-1] for e in out.logprobs]
        return StepResult(
            step_id=step.step_id, req_ids=[s.req_id for s in states],
            sampled_token_ids=[t[-1] for t in out.token_ids], logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, spec_num_accepted=out.num_accepted, spec_logprobs=spec_logprobs,
        )

    def _prompt_logprobs(self, chunks: list[ScheduledChunk], query_starts: list[int], hidden: Any) -> list[PromptLogprobs]:
        """Score the prompt positions of this step's chunks for requests that asked.

        The row of position q (hidden[query_starts[i] + q - start]) predicts token q + 1; a chunk
        covering [start, end) scores prompt tokens max(start + 1, next) .. min(end, P - 1).
        """
        rows: list[int] = []
        targets: list[int] = []
        spans: list[tuple[RequestState, int, int]] = []  # (state, first position, count)
        for index, chunk in enumerate(chunks):
            state = chunk.state
            if state.req_id not in self._prompt_logprobs_pending:
                continue
            start, end = chunk.num_computed, chunk.num_computed + chunk.num_scheduled
            first = max(start + 1, state.prompt_logprobs_next)
            last = min(end, state.num_prompt_tokens - 1)
            if last >= state.prompt_logprobs_next:
                state.prompt_logprobs_next = last + 1
            if state.prompt_logprobs_next >= state.num_prompt_tokens:
                self._prompt_logprobs_pending.discard(state.req_id)
            if first > last:
                continue
            base = query_starts[index] - start
            rows.extend(range(base + first - 1, base + last))
            targets.extend(state.token_ids[first : last + 1])
            spans.append((state, first, last + 1 - first))
        if not rows:
            return []
        entries = []
        row_index = torch.tensor(rows, dtype=torch.int64, device=hidden.device)
        target_ids = torch.tensor(targets, dtype=torch.int64, device=hidden.device)
        num_top = max(s.prompt_logprobs or 0 for s, _, _ in spans)
        for begin in range(0, len(rows), PROMPT_LOGITS_ROWS):
            piece = slice(begin, begin + PROMPT_LOGITS_ROWS)
            logits = self.model.compute_logits(hidden[row_index[piece]])
            if self.is_output_rank:
                entries.extend(prompt_token_logprobs(logits, target_ids[piece], num_top))
        if not self.is_output_rank:
            return []
        out = []
        offset = 0
        for state, first, count in spans:
            k = state.prompt_logprobs or 0
            part = entries[offset : offset + count]
            if k < num_top:
                part = [SampleLogprobs(e.logprob, e.top_token_ids[:k], e.top_logprobs[:k], e.rank) for e in part]
            out.append(PromptLogprobs(state.req_id, first, part))
            offset += count
        return out

    def _forward(self, inputs: StepInputs) -> Any:
        if self.pipeline is None:
            return self.model(inputs.input_ids, inputs.positions, inputs.attn)
        intermediate = None
        if self.parallel_context.pp_rank > 0:
            intermediate = self.pipeline.recv(inputs.input_ids.shape[0])
        out = self.model(inputs.input_ids, inputs.positions, inputs.attn, intermediate)
        if not self.is_last_stage:
            self.pipeline.send(out)
        return out

    def _result(
        self,
        step_id: int,
        req_ids: list[str],
        token_ids: list[int] | None,
        logprobs: list[SampleLogprobs | None] | None = None,
        prompt_logprobs: list[PromptLogprobs] | None = None,
    ) -> StepResult:
        return StepResult(
            step_id=step_id, req_ids=req_ids, sampled_token_ids=token_ids or [], logprobs=logprobs,
            prompt_logprobs=prompt_logprobs or [],
        )

    def _add_request(self, new: NewRequest) -> ScheduledChunk:
        if new.req_id in self.requests:
            logger.warning("request %r sent again as new; replacing its state", new.req_id)
        sampling = None
        if self.samples:
            seed = new.sampling.seed
            sampling = RequestSamplingState(
                new.sampling,
                new.prompt_token_ids,
                seed=derive_seed(self.seed, new.req_id) if seed is None else seed,
                device=self.device,
            )
        state = RequestState(
            req_id=new.req_id,
            token_ids=list(new.prompt_token_ids),
            num_prompt_tokens=len(new.prompt_token_ids),
            block_table=BlockTable(new.block_ids),
            num_computed_tokens=new.num_computed_tokens,
            sampling=sampling,
        )
        self.requests[new.req_id] = state
        self._prompt_logprobs_pending.discard(new.req_id)
        if new.sampling.prompt_logprobs is not None and self.is_last_stage and len(new.prompt_token_ids) > 1:
            state.prompt_logprobs = new.sampling.prompt_logprobs
            self._prompt_logprobs_pending.add(new.req_id)
        return ScheduledChunk(state, new.num_computed_tokens, new.num_scheduled_tokens)

    def _update_request(self, cached: CachedRequest) -> ScheduledChunk:
        state = self.requests.get(cached.req_id)
        if state is None:
            raise KeyError(f"step schedules unknown request {cached.req_id!r}")
        state.append_tokens(cached.new_token_ids)
        if cached.resumed:
            state.block_table.replace(cached.new_block_ids)
        else:
            state.block_table.append(cached.new_block_ids)
        state.num_computed_tokens = cached.num_computed_tokens
        return ScheduledChunk(state, cached.num_computed_tokens, cached.num_scheduled_tokens)
