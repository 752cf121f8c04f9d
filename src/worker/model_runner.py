"""ModelRunner: keep per-request state, turn each ExecuteStep into one forward, sample.

One step, as the engine sends it (docs/INTERFACES.md section 1):

    1) drop ``finished_ids``
    2) add ``new_requests``; apply ``cached_requests`` diffs (new tokens, new blocks, resumed)
    3) flatten the scheduled chunks into tensors and run ``model.forward``
    4) on the last pipeline stage compute logits for the requests that sample (every TP rank:
       the vocab gather is a collective); the output rank samples and returns a StepResult

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
from shardline.worker.sampler import RequestSamplingState, derive_seed, sample

logger = logging.getLogger(__name__)


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
        self._timer = _RunnerTimer.from_env(f"worker-pp{pc.pp_rank}-tp{pc.tp_rank}")
        self.num_kv_blocks = 0
        self.pipeline: PipelineLink | None = None
        if pc.pp_size > 1:
            if hidden_size is None:
                raise ValueError("pipeline parallelism needs the model's hidden_size")
            self.pipeline = PipelineLink(pc, hidden_size=hidden_size, dtype=dtype)

    # ----------------------------------------------------------------- set-up
    def initialize_kv_cache(self, num_blocks: int, scratch_blocks: int = 0, populate: bool = True) -> int:
        """Allocate ``num_blocks`` blocks in every local attention layer, plus ``scratch_blocks``
        after them that the engine never hands out (ids ``num_blocks``...; CUDA graphs pad
        into one); returns bytes. ``populate=False`` leaves committing CPU pages to the caller
        (`worker.kv_cache.commit_kv_cache`)."""
        self.num_kv_blocks = num_blocks
        allocated = allocate_kv_cache(
            self.model, num_blocks + scratch_blocks, block_size=self.block_size, dtype=self.dtype,
            device=self.device, populate=populate,
        )
        # Build or load the CPU decode-attention kernel now, not in the first request's step.
        kernel_enabled(self.device, self.dtype)
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
        # 2) apply the diffs
        chunks = [self._add_request(new) for new in step.new_requests]
        chunks += [self._update_request(cached) for cached in step.cached_requests]
        if not chunks:
            return self._result(step.step_id, [], None) if self.is_output_rank else None
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
            # 4) logits and sampling
            if not self.is_last_stage or not inputs.sample_states:
                return self._result(step.step_id, [], None) if self.is_output_rank else None
            logits = self.model.compute_logits(hidden[inputs.sample_indices])
            if timer:
                timer.lap("forward + logits")
            if not self.samples:
                return None
            states = inputs.sample_states
            sampling = [s.sampling for s in states]
            if any(s is None for s in sampling):  # impossible on a sampling rank; fail loudly
                raise RuntimeError("a sampling request has no sampler state on a sampling rank")
            out = sample(logits, [s for s in sampling if s is not None], with_logprobs=self.is_output_rank)
            if self.keep_sampled_tokens:
                for state, token_id in zip(states, out.token_ids, strict=True):
                    state.append_tokens((token_id,))
        if timer:
            timer.lap("sample")
        if not self.is_output_rank:
            return None
        return self._result(step.step_id, [s.req_id for s in states], out.token_ids, out.logprobs)

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
    ) -> StepResult:
        return StepResult(
            step_id=step_id, req_ids=req_ids, sampled_token_ids=token_ids or [], logprobs=logprobs
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
