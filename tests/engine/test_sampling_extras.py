"""logit_bias, min_tokens and prompt_logprobs through the whole engine (tiny random Llama)."""

from __future__ import annotations

import pathlib
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import torch

from shardline.engine import Engine, EngineConfig, InvalidRequestError, SamplingParams
from shardline.engine.request import RequestOutput

EOS = 256  # the tiny tokenizer's <|endoftext|>, the model's eos_token_id
PROMPT = "the quick brown fox jumps over the lazy dog, again and again"


def _cfg(path: pathlib.Path, **kw: object) -> EngineConfig:
    base: dict[str, object] = dict(model=str(path), max_model_len=256, num_kv_blocks=128, block_size=4,
                                   transport="inproc")
    base.update(kw)
    return EngineConfig(**base)  # type: ignore[arg-type]


async def _outputs(engine: Engine, prompt: str | list[int], params: SamplingParams) -> list[RequestOutput]:
    return [out async for out in engine.generate(prompt, params)]


async def _tokens(engine: Engine, prompt: str | list[int], params: SamplingParams) -> list[int]:
    return (await _outputs(engine, prompt, params))[-1].token_ids


def greedy(**kw: Any) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 6, "temperature": 0.0, "ignore_eos": True, **kw})


async def test_logit_bias_bans_and_forces_tokens(tiny_llama_dir: pathlib.Path) -> None:
    async with await Engine.start(_cfg(tiny_llama_dir)) as engine:
        plain = await _tokens(engine, PROMPT, greedy())
        banned = await _tokens(engine, PROMPT, greedy(logit_bias={plain[0]: -100}))
        assert banned[0] != plain[0]
        forced_id = 65 if plain[0] != 65 else 66
        forced = await _tokens(engine, PROMPT, greedy(logit_bias={str(forced_id): 100.0}))  # JSON-style key
        assert forced == [forced_id] * 6
        # A bias on a sampled (temperature 1) request forces it too; a small bias leaves greedy as is.
        sampled = await _tokens(engine, PROMPT, greedy(temperature=1.0, seed=5, logit_bias={forced_id: 100}))
        assert sampled == [forced_id] * 6
        assert await _tokens(engine, PROMPT, greedy(logit_bias={plain[0]: 0.0})) == plain
        # logprobs stay those of the raw distribution: the forced token is not certain.
        outs = await _outputs(engine, PROMPT, greedy(max_tokens=1, logprobs=1, logit_bias={forced_id: 100}))
        logprobs = outs[-1].logprobs
        assert logprobs is not None and logprobs[0].token_id == forced_id and logprobs[0].logprob < -0.5


async def test_min_tokens_holds_back_eos_and_stop_ids(tiny_llama_dir: pathlib.Path) -> None:
    eos_forced = {EOS: 100.0}
    async with await Engine.start(_cfg(tiny_llama_dir)) as engine:
        params = SamplingParams(max_tokens=10, temperature=0.0, logit_bias=eos_forced)
        outs = await _outputs(engine, PROMPT, params)
        assert outs[-1].token_ids == [EOS] and outs[-1].finish_reason == "stop"
        outs = await _outputs(engine, PROMPT, SamplingParams(max_tokens=10, temperature=0.0, logit_bias=eos_forced,
                                                             min_tokens=4))
        tokens = outs[-1].token_ids
        assert len(tokens) == 5 and EOS not in tokens[:4] and tokens[4] == EOS
        assert outs[-1].finish_reason == "stop"
        # stop_token_ids too, and a random-sampling request as well
        stop_params = SamplingParams(max_tokens=10, temperature=1.0, seed=1, ignore_eos=True, logit_bias={70: 100},
                                     stop_token_ids=[70], min_tokens=3)
        outs = await _outputs(engine, PROMPT, stop_params)
        assert len(outs[-1].token_ids) == 4 and outs[-1].token_ids[3] == 70 and outs[-1].finish_reason == "stop"
        # min_tokens == max_tokens: never stops early
        outs = await _outputs(engine, PROMPT, SamplingParams(max_tokens=3, temperature=0.0, logit_bias=eos_forced,
                                                             min_tokens=3))
        assert len(outs[-1].token_ids) == 3 and EOS not in outs[-1].token_ids
        assert outs[-1].finish_reason == "length"


def _hf_prompt_logprobs(path: pathlib.Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def _check_against_hf(output: RequestOutput, ids: list[int], reference: torch.Tensor, k: int) -> None:
    entries = output.prompt_logprobs
    assert entries is not None and len(entries) == len(ids)
    assert entries[0] is None
    for position in range(1, len(ids)):
        entry = entries[position]
        assert entry is not None
        row = reference[position - 1]
        assert entry.token_id == ids[position]
        assert entry.logprob == pytest.approx(row[ids[position]].item(), abs=1e-4), position
        values, top_ids = row.topk(k)
        assert [t for t, _ in entry.top] == top_ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
        assert entry.rank == int((row > row[ids[position]] + 1e-5).sum()) + 1


async def test_prompt_logprobs_equal_transformers_over_several_chunks(tiny_llama_dir: pathlib.Path) -> None:
    """A 70-token prompt in chunks of 16 (the step budget 32, the prefill cap 16), a short one
    in the same steps; the prefix cache holds the long prompt after its first run, yet the
    second run scores every position again (no prefix hit)."""
    long_ids = [(i * 37 + 11) % 250 for i in range(70)]
    short_ids = [72, 101, 108, 108, 111]
    reference_long = _hf_prompt_logprobs(tiny_llama_dir, long_ids)
    reference_short = _hf_prompt_logprobs(tiny_llama_dir, short_ids)
    cfg = _cfg(tiny_llama_dir, max_num_batched_tokens=32, long_prefill_token_threshold=16)
    async with await Engine.start(cfg) as engine:
        for _ in range(2):
            results: dict[str, list[RequestOutput]] = {}

            async def one(name: str, ids: list[int], params: SamplingParams, into: dict[str, Any] = results) -> None:
                into[name] = await _outputs(engine, ids, params)

            async with anyio.create_task_group() as tg:
                tg.start_soon(one, "long", long_ids, greedy(max_tokens=3, prompt_logprobs=5))
                tg.start_soon(one, "short", short_ids, greedy(max_tokens=3, prompt_logprobs=0))
                tg.start_soon(one, "plain", long_ids, greedy(max_tokens=3))
            _check_against_hf(results["long"][0], long_ids, reference_long, 5)
            _check_against_hf(results["short"][0], short_ids, reference_short, 0)
            for outs in results.values():
                assert all(out.prompt_logprobs is None for out in outs[1:])  # only on the first
            assert all(out.prompt_logprobs is None for out in results["plain"])
            # The prompt's logprobs change nothing about the generated tokens.
            assert results["long"][-1].token_ids == results["plain"][-1].token_ids
        assert engine.stats().prefix_cache_hit_tokens > 0  # "plain" took hits: the cache was there
        # A one-token prompt: just [None].
        outs = await _outputs(engine, [42], greedy(max_tokens=1, prompt_logprobs=2))
        assert outs[0].prompt_logprobs == [None]


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)])
async def test_tensor_and_pipeline_parallel_report_the_same(tiny_llama_dir: pathlib.Path, tp: int, pp: int) -> None:
    """Only the output rank reports; the other ranks still take part in the logits' collectives."""
    ids = [(i * 13 + 5) % 250 for i in range(30)]
    params = greedy(max_tokens=4, prompt_logprobs=2, logit_bias={66: 3.0}, min_tokens=2, logprobs=1)
    results = []
    for sizes in ((1, 1), (tp, pp)):
        cfg = _cfg(tiny_llama_dir, tensor_parallel_size=sizes[0], pipeline_parallel_size=sizes[1], transport="shm",
                   long_prefill_token_threshold=8)
        async with await Engine.start(cfg) as engine:
            results.append(await _outputs(engine, ids, params))
    (one, split) = results
    assert one[-1].token_ids == split[-1].token_ids
    first, second = one[0].prompt_logprobs, split[0].prompt_logprobs
    assert first is not None and second is not None and len(first) == len(second) == len(ids)
    for a, b in zip(first[1:], second[1:], strict=True):
        assert a is not None and b is not None
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert [out.prompt_logprobs for out in split[1:]] == [None] * (len(split) - 1)


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        (dict(logit_bias={5: 100.5}), "logit_bias", "[-100, 100]"),
        (dict(logit_bias={5: -101}), "logit_bias", "[-100, 100]"),
        (dict(logit_bias={5: float("nan")}), "logit_bias", "[-100, 100]"),
        (dict(logit_bias={"five": 1.0}), "logit_bias", "token ids"),
        (dict(logit_bias={-1: 1.0}), "logit_bias", ">= 0"),
        (dict(logit_bias={5: 1.0, "5": 2.0}), "logit_bias", "twice"),
        (dict(logit_bias={i: 1.0 for i in range(1025)}), "logit_bias", "at most 1024"),
        (dict(logit_bias=[1, 2]), "logit_bias", "mapping"),
        (dict(min_tokens=-1), "min_tokens", ">= 0"),
        (dict(min_tokens=1.5), "min_tokens", "integer"),
        (dict(min_tokens=7, max_tokens=6), "min_tokens", "must not exceed max_tokens (6)"),
        (dict(prompt_logprobs=-1), "prompt_logprobs", ">= 0"),
        (dict(prompt_logprobs=True), "prompt_logprobs", ">= 0"),
    ],
)
def test_bad_values_name_their_field(kwargs: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{"max_tokens": 6, **kwargs})
    assert info.value.field == field
    assert field in str(info.value) and words in str(info.value)


async def test_errors_at_submit_and_the_engine_serves_the_next_request(tiny_llama_dir: pathlib.Path) -> None:
    async with await Engine.start(_cfg(tiny_llama_dir)) as engine:
        good = await _tokens(engine, PROMPT, greedy())
        vocab = 320  # the tiny model's
        with pytest.raises(InvalidRequestError) as info:
            await _tokens(engine, PROMPT, greedy(logit_bias={vocab: 5.0}))
        assert info.value.field == "logit_bias" and f"token id {vocab} is outside the vocabulary" in str(info.value)
        assert await _tokens(engine, PROMPT, greedy()) == good
        # prompt_logprobs beyond the engine's max_logprobs (20 by default)
        with pytest.raises(InvalidRequestError) as info:
            await _tokens(engine, PROMPT, greedy(prompt_logprobs=21))
        assert info.value.field == "prompt_logprobs" and "at most 20" in str(info.value)
        assert await _tokens(engine, PROMPT, greedy()) == good
        # max_tokens left to the model (16 here): min_tokens beyond it is refused at submit.
        with pytest.raises(InvalidRequestError) as info:
            await _tokens(engine, PROMPT, SamplingParams(temperature=0.0, min_tokens=100))
        assert info.value.field == "min_tokens" and "max_tokens" in str(info.value)
        assert await _tokens(engine, PROMPT, greedy()) == good
        assert engine.stats().num_running == 0 and engine.stats().num_waiting == 0


def test_stop_strings_wait_for_min_tokens_as_in_vllm(tiny_llama_dir: pathlib.Path) -> None:
    """vLLM's detokenizer test (tests/detokenizer/test_min_tokens.py) on the byte tokenizer:
    a stop string counts only in text of the tokens after the min_tokens-th."""
    from tokenizers import Tokenizer

    from shardline.engine.detokenizer import IncrementalDetokenizer, update_batch

    tokenizer = Tokenizer.from_file(str(tiny_llama_dir / "tokenizer.json"))
    prompt = tokenizer.encode("Hello, my name is").ids
    rest = tokenizer.encode(" Lee, and I'm a student in the college of engineering").ids
    for min_tokens, stop, truth in [
        (0, (), " Lee, and I'm a student in the college of engineering"),
        (0, ("e",), " L"),
        (5, ("e",), " Lee, and I'm a stud"),  # one token per byte here: " Lee," are the five
        (3, ("ee",), " L"),  # a stop string that ends in the 4th token's text counts
    ]:
        one = IncrementalDetokenizer(tokenizer, prompt, stop=stop, min_tokens=min_tokens)
        for token in rest:  # token by token
            one.update([token])
        batched = IncrementalDetokenizer(tokenizer, prompt, stop=stop, min_tokens=min_tokens)
        update_batch([batched], [rest])  # all at once, through the batch path
        assert one.text == truth, (min_tokens, stop)
        assert batched.text == truth, (min_tokens, stop)


async def test_min_tokens_with_a_stop_string(tiny_llama_dir: pathlib.Path) -> None:
    x = 120  # "x" in the byte tokenizer
    async with await Engine.start(_cfg(tiny_llama_dir)) as engine:
        early = await _outputs(engine, PROMPT, greedy(max_tokens=8, logit_bias={x: 100}, stop=["x"]))
        assert early[-1].text == "" and len(early[-1].token_ids) == 1 and early[-1].finish_reason == "stop"
        late = await _outputs(engine, PROMPT, greedy(max_tokens=8, logit_bias={x: 100}, stop=["x"], min_tokens=3))
        assert late[-1].text == "xxx" and len(late[-1].token_ids) == 4 and late[-1].finish_reason == "stop"


async def test_a_worker_restart_keeps_min_tokens_and_prompt_logprobs(tiny_llama_dir: pathlib.Path) -> None:
    """A worker killed mid-prefill of a prompt_logprobs request and after 4 tokens of a
    min_tokens request: the new workers recompute both, the prompt's logprobs come out once each
    (equal to an undisturbed run's), and min_tokens counts the tokens generated before the crash."""
    import os
    import signal

    long_ids = [(i * 29 + 3) % 250 for i in range(240)]
    logprob_params = greedy(max_tokens=2, prompt_logprobs=1)
    eos_params = SamplingParams(max_tokens=20, temperature=0.0, logit_bias={EOS: 100.0}, min_tokens=12)
    cfg = _cfg(tiny_llama_dir, transport="shm", long_prefill_token_threshold=4, restart_backoff=0.0)
    async with await Engine.start(cfg) as engine:
        reference = await _outputs(engine, long_ids, logprob_params)
    async with await Engine.start(cfg) as engine:
        core = engine._cores[0]
        killed: list[str] = []

        def kill(reason: str) -> None:
            if not killed:
                killed.append(reason)
                os.kill(core.executor.worker_pids[0], signal.SIGKILL)

        async def min_tokens_request() -> list[RequestOutput]:
            outs = []
            async for out in engine.generate(PROMPT, eos_params):
                outs.append(out)
                if out.num_output_tokens >= 4:
                    kill("min_tokens")
            return outs

        async def prompt_logprobs_request() -> list[RequestOutput]:
            async def watch() -> None:  # kill once a third of the prompt was scored
                while not killed:
                    live = next(iter(core._live.values()), None)
                    if live is not None and live.prompt_logprobs and len(live.prompt_logprobs) > 80:
                        kill("prompt_logprobs")
                    await anyio.lowlevel.checkpoint()

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                outs = await _outputs(engine, long_ids, logprob_params)
                tg.cancel_scope.cancel()
            return outs

        outs = await prompt_logprobs_request()
        assert killed == ["prompt_logprobs"] and engine.stats().num_restarts == 1
        assert outs[-1].token_ids == reference[-1].token_ids
        got, want = outs[0].prompt_logprobs, reference[0].prompt_logprobs
        assert got is not None and want is not None and len(got) == len(want) == len(long_ids)
        for a, b in zip(got[1:], want[1:], strict=True):
            assert a is not None and b is not None
            assert (a.token_id, [t for t, _ in a.top]) == (b.token_id, [t for t, _ in b.top])
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)

        killed.clear()
        outs = await min_tokens_request()
        assert killed == ["min_tokens"] and engine.stats().num_restarts == 2
        tokens = outs[-1].token_ids
        assert len(tokens) == 13 and EOS not in tokens[:12] and tokens[12] == EOS, tokens


async def test_stop_token_text_left_out_unless_asked(tiny_llama_dir: pathlib.Path) -> None:
    """As vLLM: the stop token that ends a request is in token_ids but not in the text, unless
    include_stop_str_in_output; an EOS that ends it likewise (its text would be special anyway)."""
    async with await Engine.start(_cfg(tiny_llama_dir)) as engine:
        decode = engine.tokenizer.decode
        letter = 66  # a one-byte token of the tiny byte-level tokenizer, forced by logit_bias
        assert decode([letter]) == "B"
        for include in (False, True):
            params = greedy(logit_bias={letter: 100.0}, stop_token_ids=[letter], min_tokens=2,
                            include_stop_str_in_output=include)
            outs = await _outputs(engine, PROMPT, params)
            final = outs[-1]
            ids = final.token_ids  # min_tokens keeps the stop id out of the first two
            assert final.finish_reason == "stop" and len(ids) == 3 and ids[-1] == letter
            assert decode(ids) != decode(ids[:-1])
            assert final.text == decode(ids if include else ids[:-1]), (include, final.text)
            assert "".join(out.delta for out in outs) == final.text
        # An EOS forced as the third token: in token_ids, not in the text.
        outs = await _outputs(engine, PROMPT, SamplingParams(max_tokens=6, temperature=0.0, min_tokens=2,
                                                             skip_special_tokens=False, logit_bias={EOS: 100.0}))
        assert outs[-1].token_ids[-1] == EOS and outs[-1].finish_reason == "stop"
        assert outs[-1].text == decode(outs[-1].token_ids[:-1], skip_special_tokens=False)
        plain = await _tokens(engine, PROMPT, greedy())
        assert await _tokens(engine, PROMPT, greedy()) == plain  # the next request is served as before
