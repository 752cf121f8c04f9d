"""`SamplingParams.n`: several choices of one prompt, sharing its KV blocks, on a tiny model.

Also `include_stop_str_in_output` end to end (the detokenizer's own tests are in
tests/engine_logic/test_detokenizer.py).
"""

from __future__ import annotations

import asyncio
import pathlib
from collections import defaultdict

import pytest

from shardline.engine import (
    LLM,
    Engine,
    EngineConfig,
    InvalidRequestError,
    PromptTooLongError,
    SamplingParams,
)
from shardline.engine.llm import GenerateResult
from shardline.engine.request import MAX_N, RequestOutput
from support.waiting import wait_until

BLOCK_SIZE = 4
# 18 tokens: 4 full blocks and a partial one. Ids are in the tiny tokenizer's byte range.
PROMPT = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 44, 32, 104, 111, 119, 32, 97]
FULL_BLOCK_TOKENS = (
    (len(PROMPT) - 1) // BLOCK_SIZE * BLOCK_SIZE
)  # the last token is always computed


def _cfg(path: pathlib.Path, **kw: object) -> EngineConfig:
    base: dict[str, object] = dict(
        model=str(path),
        transport="inproc",
        max_model_len=256,
        num_kv_blocks=128,
        block_size=BLOCK_SIZE,
    )
    base.update(kw)
    return EngineConfig(**base)  # type: ignore[arg-type]


def _idle(engine: Engine) -> bool:
    stats = engine.stats()
    return stats.num_kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0


async def _choices(
    engine: Engine,
    params: SamplingParams,
    request_id: str | None = None,
    prompt: list[int] | str = PROMPT,
) -> dict[int, list[RequestOutput]]:
    """Every output of one request, by choice index, checking the stream's promises."""
    by_index: dict[int, list[RequestOutput]] = defaultdict(list)
    async for out in engine.generate(prompt, params, request_id=request_id):
        assert not by_index[out.index] or not by_index[out.index][-1].finished, (
            "output after the finished one"
        )
        by_index[out.index].append(out)
    assert sorted(by_index) == list(range(params.n))
    for outs in by_index.values():
        assert outs[-1].finished
        assert "".join(o.delta for o in outs) == outs[-1].text
        assert [t for o in outs for t in o.delta_token_ids] == outs[-1].token_ids
        if request_id is not None:
            assert {o.request_id for o in outs} == {request_id}
    return by_index


def _final_tokens(by_index: dict[int, list[RequestOutput]]) -> list[list[int]]:
    return [by_index[i][-1].token_ids for i in sorted(by_index)]


async def test_seeded_choices_differ_reproduce_and_share_the_prompt_blocks(
    tiny_llama_dir: pathlib.Path,
) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    async with await Engine.start(_cfg(tiny_llama_dir)) as engine:
        before = engine.stats()
        first = await _choices(engine, params, request_id="par")
        after = engine.stats()
        tokens = _final_tokens(first)
        assert all(len(t) == 12 for t in tokens)
        assert len({tuple(t) for t in tokens}) == 3, "the choices must differ"
        for outs in first.values():
            assert outs[-1].finish_reason == "length"
            assert outs[-1].num_prompt_tokens == len(PROMPT)
        # Choice 0 computed the prompt; choices 1 and 2 found its 4 full blocks cached and
        # computed only the last, partial block.
        hits = after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens
        computed = after.prompt_tokens_computed - before.prompt_tokens_computed
        assert hits == 2 * FULL_BLOCK_TOKENS
        assert computed == len(PROMPT) + 2 * (len(PROMPT) - FULL_BLOCK_TOKENS)
        await wait_until(lambda: _idle(engine))

        # Reproducible (another request id), and choice i is what one request with seed + i gives.
        assert _final_tokens(await _choices(engine, params, request_id="again")) == tokens
        for index in range(3):
            single = await _choices(
                engine,
                SamplingParams(temperature=1.0, seed=1234 + index, max_tokens=12, ignore_eos=True),
            )
            assert _final_tokens(single) == [tokens[index]]
        # Without a seed each choice samples on its own (its own request id's seed).
        unseeded = _final_tokens(
            await _choices(
                engine, SamplingParams(n=3, temperature=1.0, max_tokens=12, ignore_eos=True)
            )
        )
        assert len({tuple(t) for t in unseeded}) == 3
        await wait_until(lambda: _idle(engine))


async def test_greedy_choices_equal_the_single_greedy_output(tiny_llama_dir: pathlib.Path) -> None:
    async with await Engine.start(_cfg(tiny_llama_dir)) as engine:
        greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        [single] = _final_tokens(await _choices(engine, greedy))
        text = "a prompt given as text, several blocks long"
        [single_text] = _final_tokens(await _choices(engine, greedy, prompt=text))
        # A fresh engine: nothing of the prompts is cached before the n=2 requests.
    async with await Engine.start(_cfg(tiny_llama_dir)) as engine:
        both = SamplingParams(n=2, temperature=0.0, max_tokens=16, ignore_eos=True)
        assert _final_tokens(await _choices(engine, both)) == [single, single]
        assert _final_tokens(await _choices(engine, both, prompt=text)) == [
            single_text,
            single_text,
        ]
        replies: dict[int, str] = {}
        async for out in engine.chat([{"role": "user", "content": "hi"}], both, request_id="chat"):
            assert out.request_id == "chat"
            if out.finished:
                replies[out.index] = out.text
        assert sorted(replies) == [0, 1] and replies[0] == replies[1]
        await wait_until(lambda: _idle(engine))


async def test_abort_and_cancel_end_every_choice_and_free_every_block(
    tiny_llama_dir: pathlib.Path,
) -> None:
    long = SamplingParams(n=4, temperature=1.0, max_tokens=200, ignore_eos=True)
    async with await Engine.start(_cfg(tiny_llama_dir)) as engine:
        # engine.abort with the caller's id: every choice ends with "abort", then the stream ends.
        seen: dict[int, list[RequestOutput]] = defaultdict(list)
        aborted = False
        async for out in engine.generate(PROMPT, long, request_id="victim"):
            assert out.request_id == "victim"
            seen[out.index].append(out)
            if not aborted and len(seen) == 4 and all(len(v) >= 2 for v in seen.values()):
                await engine.abort("victim")
                aborted = True
        assert aborted
        assert sorted(seen) == [0, 1, 2, 3]
        for outs in seen.values():
            assert outs[-1].finished and outs[-1].finish_reason == "abort"
            assert len(outs[-1].token_ids) < 200
        await wait_until(lambda: _idle(engine))

        # Cancelling the consumer's task aborts every choice too.
        started = asyncio.Event()

        async def consume() -> None:
            async for out in engine.generate(PROMPT, long, request_id="cancelled"):
                if out.index == 3:
                    started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 30)
        assert engine.stats().num_kv_blocks_used > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: _idle(engine))

        # Leaving the loop early (aclose) as well.
        outputs = engine.generate(PROMPT, long)
        async for out in outputs:
            if out.index == 2:
                break
        await outputs.aclose()  # type: ignore[attr-defined]
        await wait_until(lambda: _idle(engine))
        stats = engine.stats()
        assert stats.num_kv_blocks_used == 0
        # The engine still serves.
        assert len(_final_tokens(await _choices(engine, SamplingParams(n=2, max_tokens=3)))) == 2


async def test_every_choice_runs_on_the_replica_of_choice_0(tiny_llama_dir: pathlib.Path) -> None:
    """With data parallelism the choices stay together: routing each to the least busy
    replica would send choice 1 to the idle one, which has nothing cached."""
    params = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    async with await Engine.start(_cfg(tiny_llama_dir, data_parallel_size=2)) as engine:
        await _choices(engine, params)
        per_core = [(s.prompt_tokens, s.prefix_cache_hit_tokens) for s in engine.per_core_stats()]
        assert sorted(per_core) == [(0, 0), (3 * len(PROMPT), 2 * FULL_BLOCK_TOKENS)]


@pytest.mark.parametrize("n", [0, -1, MAX_N + 1, 2.0, True, "2"])
def test_bad_n_is_refused_naming_n(n: object) -> None:
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(n=n)  # type: ignore[arg-type]
    assert err.value.field == "n"
    assert str(MAX_N) in str(err.value)


async def test_refused_requests_leave_the_engine_serving(tiny_llama_dir: pathlib.Path) -> None:
    async with await Engine.start(_cfg(tiny_llama_dir)) as engine:
        # seed + i must fit the workers' 64-bit seeds for every choice.
        with pytest.raises(InvalidRequestError) as err:
            await _choices(engine, SamplingParams(n=3, seed=2**63 - 2, max_tokens=2))
        assert err.value.field == "seed"
        # A context overflow is refused once, for the whole request.
        with pytest.raises(PromptTooLongError):
            await _choices(engine, SamplingParams(n=3, max_tokens=250))
        # A long text is tokenized off the event loop (here refused from its length there).
        with pytest.raises(PromptTooLongError):
            await _choices(engine, SamplingParams(n=2, max_tokens=2), prompt="x" * 20_000)
        # The same id twice at once is refused (its choices' ids would collide).
        running = engine.generate(
            PROMPT, SamplingParams(n=2, max_tokens=50, ignore_eos=True), request_id="dup"
        )
        first = await running.__anext__()
        assert first.index == 0
        with pytest.raises(InvalidRequestError) as err:
            await _choices(engine, SamplingParams(n=2, max_tokens=2), request_id="dup")
        assert err.value.field == "request_id"
        await running.aclose()  # type: ignore[attr-defined]
        await wait_until(lambda: _idle(engine))
        assert (
            len(_final_tokens(await _choices(engine, SamplingParams(n=MAX_N, max_tokens=2))))
            == MAX_N
        )
        await wait_until(lambda: _idle(engine))


async def test_include_stop_str_in_output(tiny_llama_dir: pathlib.Path) -> None:
    async with await Engine.start(_cfg(tiny_llama_dir)) as engine:
        greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        [[full]] = [[outs[-1].text for outs in (await _choices(engine, greedy)).values()]]
        # A stop string from the middle of the greedy text (its first occurrence).
        stop = next(
            full[k : k + 2]
            for k in range(4, len(full) - 2)
            if full[k : k + 2].strip() == full[k : k + 2]
        )
        cut = full.index(stop)
        for include, expected in ((False, full[:cut]), (True, full[: cut + len(stop)])):
            params = SamplingParams(
                temperature=0.0,
                max_tokens=40,
                ignore_eos=True,
                stop=[stop],
                include_stop_str_in_output=include,
            )
            for outs in (await _choices(engine, params, request_id="stop")).values():
                assert outs[-1].finish_reason == "stop"
                assert outs[-1].text == expected  # _choices checked the deltas add up to it
        with pytest.raises(InvalidRequestError) as err:
            SamplingParams(include_stop_str_in_output="yes")  # type: ignore[arg-type]
        assert err.value.field == "include_stop_str_in_output"


def test_llm_generate_returns_every_choice(tiny_llama_dir: pathlib.Path) -> None:
    with LLM(_cfg(tiny_llama_dir)) as llm:
        greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        [one] = llm.generate([PROMPT], greedy, use_tqdm=False)
        results = llm.generate(
            [PROMPT, PROMPT[:7]],
            SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True),
            use_tqdm=False,
        )
        [greedy_pair] = llm.generate(
            [PROMPT],
            SamplingParams(n=2, temperature=0.0, max_tokens=6, ignore_eos=True),
            use_tqdm=False,
        )
    # n=1 as before: one result per prompt that is the request's final output.
    assert isinstance(one, RequestOutput) and isinstance(one, GenerateResult)
    assert (
        one.finished
        and len(one.token_ids) == 6
        and [o.token_ids for o in one.outputs] == [one.token_ids]
    )
    assert len(results) == 2
    for result in results:
        assert [o.index for o in result.outputs] == [0, 1, 2]
        assert all(o.finished and len(o.token_ids) == 6 for o in result.outputs)
        assert result.token_ids == result.outputs[0].token_ids and result.index == 0
        assert len({tuple(o.token_ids) for o in result.outputs}) == 3
    assert [o.token_ids for o in greedy_pair.outputs] == [one.token_ids, one.token_ids]
