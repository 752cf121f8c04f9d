"""The scheduler's side of structured output: a constrained request never runs ahead of its
grammar (it sits out a step while its previous token is in flight), its matcher advances with
each applied token, a complete grammar ends it with "stop", a refused token with "error"."""

from __future__ import annotations

from typing import Any

from shardline.engine.kv_cache import KVCacheManager
from shardline.engine.request import FinishReason, Request, SamplingParams
from shardline.engine.scheduler import Scheduler, SchedulerConfig
from shardline.engine.structured_output import GrammarCompiler, StructuredOutputSpec

EOS = 2  # SmolLM2-Instruct's <|im_end|> (fixtures `compiler`, `tokenizer`: conftest.py)


def _scheduler(*, async_scheduling: bool) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_model_len=64,
        block_size=4,
        workers_keep_sampled=True,
        async_scheduling=async_scheduling,
    )
    return Scheduler(config, KVCacheManager(64, 4))


def _request(
    req_id: str, compiler: GrammarCompiler | None, spec: StructuredOutputSpec | None
) -> Request:
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, structured_output=spec)
    request = Request(req_id, [5, 6, 7, 8, 9], params, eos_token_ids=[EOS], arrival_time=0.0)
    if spec is not None and compiler is not None:
        request.grammar = compiler.matcher(spec)
    return request


def test_constrained_request_sits_out_the_step_while_its_token_is_in_flight(
    compiler: GrammarCompiler, tokenizer: Any
) -> None:
    scheduler = _scheduler(async_scheduling=True)
    spec = StructuredOutputSpec.regex("[a-z]{1,30}")
    scheduler.add_request(_request("c", compiler, spec))
    scheduler.add_request(_request("f", None, None))
    assert scheduler.num_constrained == 1
    step1 = scheduler.schedule()
    assert step1.structured_ids == ["c"] and set(step1.num_scheduled_tokens) == {"c", "f"}
    # Scheduled before step 1's tokens are known: the free request goes on, the constrained
    # one waits (its next mask depends on the token in flight).
    step2 = scheduler.schedule()
    assert set(step2.num_scheduled_tokens) == {"f"} and step2.structured_ids == []
    token = tokenizer.encode("abc", add_special_tokens=False).ids[0]
    scheduler.update_from_output(step1, {"c": token, "f": 11})
    assert scheduler.get_request("c").grammar.num_accepted == 1  # type: ignore[union-attr]
    step3 = scheduler.schedule()
    assert "c" in step3.num_scheduled_tokens and step3.structured_ids == ["c"]


def test_complete_grammar_stops_and_refused_token_errors(
    compiler: GrammarCompiler, tokenizer: Any
) -> None:
    scheduler = _scheduler(async_scheduling=False)
    yes = tokenizer.encode("yes", add_special_tokens=False).ids
    scheduler.add_request(_request("done", compiler, StructuredOutputSpec.choice(["yes"])))
    scheduler.add_request(_request("bad", compiler, StructuredOutputSpec.choice(["yes"])))
    no = tokenizer.encode("no", add_special_tokens=False).ids[0]
    updates = []
    for index, token in enumerate(yes):
        out = scheduler.schedule()
        assert "done" in out.structured_ids
        sampled = {"done": token}
        if index == 0:
            sampled["bad"] = no  # a token the mask forbade (a bug somewhere): the request fails
        updates += scheduler.update_from_output(out, sampled)
    by_id = {
        (u.request.request_id, u.finish_reason) for u in updates if u.finish_reason is not None
    }
    # "yes" complete: "stop" although the request ignores EOS, without sampling an EOS.
    assert by_id == {("done", FinishReason.STOP), ("bad", FinishReason.ERROR)}
    bad = next(u for u in updates if u.request.request_id == "bad")
    assert bad.new_token_ids == [] and "refused" in (bad.error or "")
    assert bad.request.output_token_ids == []
    assert scheduler.num_constrained == 0 and not scheduler.has_unfinished_requests()
