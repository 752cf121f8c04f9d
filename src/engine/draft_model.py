"""Speculative decoding with a draft model: a second engine proposes the target's draft tokens.

`speculative_config={"model": "path/to/small-model", "num_speculative_tokens": k}` (method
"draft_model", as vLLM's) starts, beside the target's engine, a `DraftModelProposer`: an `Engine`
of its own serving the draft model (one worker, no parallelism, its own paged KV cache with
prefix caching on), in the same event loop. Before each step the core asks it for the drafts of
every running request whose next step is a decode and that may speculate
(`Scheduler.draft_candidates`): each is one greedy request to the draft engine, with the
request's whole context as its prompt and k as max_tokens, all sent at once, so the draft engine
batches them like any other requests. Its prefix cache holds every context's full blocks from the
step before, so a proposal computes the last partial block and the tokens accepted since, then
decodes k tokens. The scheduler takes the proposals as it takes n-gram ones
(`Scheduler._propose`): the target verifies them in one step, keeps the greedy tokens exactly (and
the distribution when sampling: a greedy draft is a point-mass proposal, which the rejection
sampler of worker/speculative.py takes as it takes n-gram drafts) and rolls back the rest.

Because drafts are only tokens, the target's parallelism, transports, preemption and recovery
are untouched: a draft is checked by the same verification whatever made it. The draft engine
keeps the target's block size, KV capacity, sequence and batch limits and device; its context
limit is its own: a context longer than the draft model takes gets no drafts (that request decodes
one token a step). A draft model must share the target's tokenizer (the vocabularies are compared
at start, and a different one is refused naming both models). If the draft engine fails, the step
goes on without drafts and the error is logged (once per kind); the target is unaffected.

Costs, as vLLM's draft-model method: the draft model's weights and KV cache (its own blocks, as
many as the target's), and k draft steps before each target step that has drafts (the first
computes the context's new tokens and yields the first draft, then k - 1 decodes).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio

from shardline.engine.request import SamplingParams
from shardline.engine.speculative import SpeculativeConfig, SpeculativeConfigError

if TYPE_CHECKING:
    from shardline.engine.api import Engine
    from shardline.engine.config import EngineConfig

logger = logging.getLogger(__name__)

# Target settings the draft engine keeps (everything else is the draft model's own or default).
_SHARED_FIELDS = (
    "device", "dtype", "block_size", "num_kv_blocks", "kv_cache_memory_bytes", "kv_cache_dtype",
    "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens", "seed", "plugins",
    "worker_start_timeout", "heartbeat_interval", "worker_timeout", "max_worker_restarts",
    "restart_backoff", "num_threads", "cuda_graphs",
)


def draft_engine_config(target: EngineConfig, spec: SpeculativeConfig) -> EngineConfig:
    """The draft engine's configuration: the draft model with the target's block size, KV
    capacity, limits and device; one local worker (shm, or in-process when the target is),
    prefix caching on, no generation-config defaults (its requests say everything), no stats
    lines of its own."""
    from shardline.engine.config import EngineConfig

    assert spec.model is not None  # SpeculativeConfig refuses method "draft_model" without one
    shared: dict[str, Any] = {name: getattr(target, name) for name in _SHARED_FIELDS}
    return EngineConfig(
        model=spec.model,
        transport="inproc" if target.transport == "inproc" else "shm",
        enable_prefix_caching=True,
        generation_config="vllm",
        log_stats_interval=0.0,
        async_scheduling=False,
        **shared,
    )


def check_same_tokenizer(target: Any, draft: Any, target_name: str, draft_name: str) -> None:
    """Refuse a draft model whose tokenizer is not the target's (token ids would mean other
    text): the vocabularies (token -> id) must be equal."""
    target_vocab, draft_vocab = target.get_vocab(), draft.get_vocab()
    if target_vocab == draft_vocab:
        return
    differing = sum(1 for t, i in target_vocab.items() if draft_vocab.get(t) != i)
    raise SpeculativeConfigError(
        f"speculative_config model {draft_name!r} does not share the tokenizer of {target_name!r} "
        f"(vocabularies of {len(draft_vocab)} and {len(target_vocab)} tokens, {differing} of the "
        "target's tokens with another id or missing): a draft model must use the target's tokenizer"
    )


class DraftModelProposer:
    """The draft engine and the proposals it makes (module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._errors_logged: set[str] = set()
        self._count = 0

    @classmethod
    async def start(cls, target: EngineConfig, spec: SpeculativeConfig, target_tokenizer: Any,
                    target_name: str) -> DraftModelProposer:
        """Start the draft engine and check its tokenizer against the target's (closing it
        again when refused)."""
        from shardline.engine.api import Engine
        from shardline.engine.config import ConfigError

        engine = await Engine.start(draft_engine_config(target, spec))
        try:
            check_same_tokenizer(target_tokenizer, engine.tokenizer, target_name, str(spec.model))
        except SpeculativeConfigError as exc:
            await engine.aclose()
            raise ConfigError("speculative_config", str(exc)) from None
        except BaseException:
            await engine.aclose()
            raise
        logger.info("draft model %s ready for speculative decoding (k=%d, max_model_len=%d)",
                    spec.model, spec.num_speculative_tokens, engine.max_model_len)
        return cls(engine)

    async def propose(self, candidates: Sequence[tuple[str, list[int], int]]) -> dict[str, list[int]]:
        """Drafts for `(request id, context token ids, k)`, all requested at once; a context
        beyond the draft model's limit, or a request the draft engine failed, gets none."""
        drafts: dict[str, list[int]] = {}
        limit = self.engine.max_model_len

        async def one(req_id: str, context: list[int], k: int) -> None:
            k = min(k, limit - len(context))
            if k < 1:
                return
            params = SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True)
            self._count += 1
            try:
                async for out in self.engine.generate(context, params, request_id=f"draft-{self._count}"):
                    if out.finished:
                        drafts[req_id] = list(out.token_ids)
            except Exception as exc:  # the target goes on without this request's drafts
                kind = type(exc).__name__
                if kind not in self._errors_logged:
                    self._errors_logged.add(kind)
                    logger.warning("draft model proposal failed (%s: %s); the step goes on "
                                   "without drafts (logged once per kind of error)", kind, exc)

        async with anyio.create_task_group() as tg:
            for req_id, context, k in candidates:
                tg.start_soon(one, req_id, context, k)
        return drafts

    async def aclose(self) -> None:
        await self.engine.aclose()
