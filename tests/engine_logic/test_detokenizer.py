"""IncrementalDetokenizer with a real byte-level BPE tokenizer built in the test."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.detokenizer import IncrementalDetokenizer

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
