"""IncrementalDetokenizer with a real byte-level BPE tokenizer built in the test."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from shardline.engine.detokenizer import IncrementalDetokenizer, update_batch

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "héllo wörld, ça va? Ünïcödé everywhere.",
    "你好，世界。今天天气很好。",
    "emoji time 🙂🚀 and more 🙂 done",
    "STOP here. Observation: the end ### fin",
] * 3


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> tuple[list[str], bool]:
    deltas: list[str] = []
    for token_id in ids:
        delta, stopped = detok.update([token_id])
        deltas.append(delta)
        if stopped:
            return deltas, True
    return deltas, False


def test_multibyte_characters_are_never_split(tokenizer: Tokenizer) -> None:
    text = "emoji 🚀🙂 你好 wörld"
    ids = tokenizer.encode(text).ids
    # The point of the test: some character really spans several tokens.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Hello").ids)
    deltas, stopped = stream(detok, ids)
    assert not stopped
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text
    assert detok.text == text


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet="ab 你好🙂éSTOP\n.", min_size=0, max_size=40))
def test_streamed_text_equals_full_decode(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).ids
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas, _ = stream(detok, ids)
    assert "".join(deltas) + detok.flush() == tokenizer.decode(ids)


@pytest.mark.parametrize("stop", ["STOP", "S", "end ###", "\n\n", "界。"])
def test_stop_string_is_cut_and_never_emitted(tokenizer: Tokenizer, stop: str) -> None:
    before = "first part 你好 "
    text = before + stop + " after the stop"
    ids = tokenizer.encode(text).ids
    detok = IncrementalDetokenizer(tokenizer, [], stop=[stop, "never-appears"])
    deltas, stopped = stream(detok, ids)
    assert stopped
    assert detok.stop_string == stop
    assert "".join(deltas) == detok.text
    expected = (before + stop)[: (before + stop).index(stop)]
    assert detok.text == expected
    assert stop not in detok.text
    # Finished by the stop string: nothing more comes out.
    assert detok.update(ids[:1]) == ("", True)
    assert detok.flush() == ""


@pytest.mark.parametrize("stop", ["STOP", "S", "end ###", "\n\n", "界。"])
def test_include_stop_str_in_output_keeps_the_stop_string(tokenizer: Tokenizer, stop: str) -> None:
    before = "first part 你好 "
    text = before + stop + " after the stop " + stop
    detok = IncrementalDetokenizer(tokenizer, [], stop=[stop, "never-appears"], include_stop_str_in_output=True)
    deltas, stopped = stream(detok, tokenizer.encode(text).ids)
    assert stopped and detok.stop_string == stop
    assert detok.text == before + stop  # up to the end of the first occurrence, nothing after
    assert "".join(deltas) == detok.text
    assert detok.flush() == ""


def test_include_stop_str_in_output_holds_nothing_back(tokenizer: Tokenizer) -> None:
    """What could begin a stop string is emitted at once: with the stop kept in the text,
    what came before is a prefix of the final text whether or not the stop completes."""
    detok = IncrementalDetokenizer(tokenizer, [], stop=["STOP!"], include_stop_str_in_output=True)
    deltas, stopped = stream(detok, tokenizer.encode("go STO").ids)
    assert not stopped and "".join(deltas) == "go STO"
    delta, stopped = detok.update(tokenizer.encode("P! then more").ids)
    assert stopped and "".join(deltas) + delta == detok.text == "go STOP!"


@settings(max_examples=100, deadline=None)
@given(
    text=st.text(alphabet="ab 你好🙂éSTOP\n.", min_size=0, max_size=40),
    stops=st.lists(st.text(alphabet="ab 你好🙂éSTOP\n.", min_size=1, max_size=4), min_size=1, max_size=3),
    include=st.booleans(),
)
def test_stop_strings_cut_where_a_scan_of_the_whole_text_cuts(
    tokenizer: Tokenizer, text: str, stops: list[str], include: bool
) -> None:
    ids = tokenizer.encode(text).ids
    full = tokenizer.decode(ids)
    # The first stop string to be completed (the earliest end; the longest one ending there).
    ends = [(full.index(s) + len(s), -len(s)) for s in stops if s in full]
    detok = IncrementalDetokenizer(tokenizer, [], stop=stops, include_stop_str_in_output=include)
    deltas, stopped = stream(detok, ids)
    if not ends:
        assert not stopped
        assert "".join(deltas) + detok.flush() == full
        return
    end, minus_length = min(ends)
    assert stopped
    assert "".join(deltas) == detok.text == (full[:end] if include else full[: end + minus_length])


def test_stop_prefix_is_held_back_then_released(tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, [], stop=["STOP!"])
    emitted = ""
    for token_id in tokenizer.encode("go STO").ids:
        delta, stopped = detok.update([token_id])
        assert not stopped
        emitted += delta
    # "STO" could still become "STOP!": held back.
    assert not emitted.endswith("STO")
    assert "go" in emitted
    delta, stopped = detok.update(tokenizer.encode("P later").ids)
    assert not stopped
    # "STOP " can no longer become "STOP!": everything is released.
    assert emitted + delta == "go STOP later"
    assert detok.flush() == ""


def test_flush_releases_a_held_stop_prefix(tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, [], stop=["### fin"])
    deltas, stopped = stream(detok, tokenizer.encode("the end ##").ids)
    assert not stopped
    assert "".join(deltas) == "the end "
    assert detok.flush() == "##"
    assert detok.text == "the end ##"


def test_stop_string_split_across_many_tokens(tokenizer: Tokenizer) -> None:
    text = "abc 🙂🙂 xyz"
    ids = tokenizer.encode(text).ids
    detok = IncrementalDetokenizer(tokenizer, [], stop=["🙂 x"])
    deltas, stopped = stream(detok, ids)
    assert stopped
    assert detok.text == "abc 🙂"


def test_special_tokens_skipped_or_kept(tokenizer: Tokenizer) -> None:
    eos = tokenizer.token_to_id("<eos>")
    ids = tokenizer.encode("Hello").ids + [eos]
    skipping = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    deltas, _ = stream(skipping, ids)
    assert "".join(deltas) + skipping.flush() == "Hello"
    keeping = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    deltas, _ = stream(keeping, ids)
    assert ("".join(deltas) + keeping.flush()).endswith("<eos>")


def test_first_output_token_decodes_in_prompt_context(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("The quick brown").ids
    output = tokenizer.encode(" fox jumps").ids
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas, _ = stream(detok, output)
    assert "".join(deltas) + detok.flush() == " fox jumps"


# ---------------------------------------------------------------------------------------------
# update_batch: the engine's per-step path must give exactly what per-request `update` gives.


class _DecodeOnly:
    """A tokenizer without `decode_batch` (the batch then calls `update` for it)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


_STOPS = [(), ("STOP",), ("界。", "never-appears"), ("o w",), ("🙂 d",)]
_TEXTS = st.text(alphabet="ab 你好🙂éSTOP\n.ow", min_size=1, max_size=30)


@st.composite
def _batch_requests(draw: st.DrawFn) -> list[dict[str, object]]:
    count = draw(st.integers(1, 6))
    return [
        {
            "text": draw(_TEXTS),
            "prompt": draw(st.sampled_from(["", "Hello", "你好"])),
            "stop": draw(st.sampled_from(_STOPS)),
            "skip": draw(st.booleans()),
            "eos_at": draw(st.none() | st.integers(0, 10)),
            "chunk": draw(st.integers(1, 3)),
            "decode_only": draw(st.booleans()),
            "include_stop": draw(st.booleans()),
        }
        for _ in range(count)
    ]


def _run_batch(tokenizer: Tokenizer, requests: list[dict[str, object]], batched: bool) -> list[list[tuple[str, bool]]]:
    eos = tokenizer.token_to_id("<eos>")
    detoks, streams = [], []
    for req in requests:
        ids = tokenizer.encode(str(req["text"])).ids
        if req["eos_at"] is not None:
            ids.insert(min(int(req["eos_at"]), len(ids)), eos)  # type: ignore[call-overload]
        chunk = int(req["chunk"])  # type: ignore[call-overload]
        streams.append([ids[i : i + chunk] for i in range(0, len(ids), chunk)])
        decoder = _DecodeOnly(tokenizer) if req["decode_only"] else tokenizer
        prompt = tokenizer.encode(str(req["prompt"])).ids
        detoks.append(IncrementalDetokenizer(decoder, prompt, skip_special_tokens=bool(req["skip"]), stop=req["stop"],  # type: ignore[arg-type]
                                             include_stop_str_in_output=bool(req.get("include_stop"))))
    steps = max(len(s) for s in streams)
    results: list[list[tuple[str, bool]]] = []
    for step in range(steps):
        new = [s[step] if step < len(s) else [] for s in streams]
        if batched:
            results.append(update_batch(detoks, new))
        else:
            results.append([d.update(ids) for d, ids in zip(detoks, new, strict=True)])
    results.append([(d.flush(), d.stopped) for d in detoks])
    results.append([(d.text, d.stop_string is not None) for d in detoks])
    return results


@settings(max_examples=150, deadline=None)
@given(requests=_batch_requests())
def test_update_batch_equals_update(tokenizer: Tokenizer, requests: list[dict[str, object]]) -> None:
    assert _run_batch(tokenizer, requests, batched=True) == _run_batch(tokenizer, requests, batched=False)


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(_TEXTS, min_size=1, max_size=8), skip=st.booleans())
def test_update_batch_plain_fast_path_equals_update(tokenizer: Tokenizer, texts: list[str], skip: bool) -> None:
    """Every request on one tokenizer, no stop strings: the step's usual fast path."""
    requests: list[dict[str, object]] = [
        {"text": t, "prompt": "Hello", "stop": (), "skip": skip, "eos_at": 2, "chunk": 1, "decode_only": False}
        for t in texts
    ]
    assert _run_batch(tokenizer, requests, batched=True) == _run_batch(tokenizer, requests, batched=False)


def test_update_batch_leaves_the_fast_path_cleanly(tokenizer: Tokenizer) -> None:
    """A stop string late in the batch: the tokens the fast path already added are taken back."""
    texts = ["Hello world", "ab 你好 🙂", "STOP here"]
    plain = [IncrementalDetokenizer(tokenizer, []) for _ in texts]
    mixed = [IncrementalDetokenizer(tokenizer, []) for _ in texts[:2]] + [
        IncrementalDetokenizer(tokenizer, [], stop=["here"])
    ]
    ids = [tokenizer.encode(t).ids for t in texts]
    got = update_batch(mixed, ids)
    want = [d.update(i) for d, i in zip(plain[:2], ids[:2], strict=True)]
    assert got[:2] == want
    assert [d.text for d in mixed[:2]] == [d.text for d in plain[:2]]
    assert got[2] == ("STOP ", True)
    assert update_batch([], []) == []
