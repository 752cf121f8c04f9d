"""Incremental detokenization with stop strings.

Decoding token by token is wrong for byte-level BPE and SentencePiece: one character can span
several tokens, and a token's text can depend on its left neighbour (leading spaces). So, as in
vLLM, we decode a short window of tokens twice -- `[prefix_offset, read_offset)` (already
emitted) and `[prefix_offset, end)` -- and emit the difference, but only once the decoded
tail no longer ends in U+FFFD (an incomplete UTF-8 sequence).

Stop strings: the decoded text runs once through an Aho-Corasick automaton of the request's
stop strings (`StopMatcher`); the request stops at the first one completed, and text that
could still be the beginning of one is held back, so what is emitted never contains (part of)
a stop string. With `include_stop_str_in_output` (vLLM's option) the text instead ends with the
stop string that ended it; nothing is held back then (what is emitted before the stop is a
prefix of that text either way), and nothing decoded after the stop string is emitted.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol

# How many prompt tokens seed the window, so the first output token decodes in context.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: Any, skip_special_tokens: bool = ...) -> str: ...


# transformers' fast tokenizers decode through these two modules; a subclass that overrides
# `decode`/`_decode` elsewhere keeps its own path.
_FAST_DECODE_MODULES = (
    "transformers.tokenization_utils_tokenizers",
    "transformers.tokenization_utils_fast",
)


def _defining_module(cls: type, name: str) -> str | None:
    for klass in cls.__mro__:
        if name in vars(klass):
            return klass.__module__
    return None


def fast_decoder(tokenizer: Any) -> Any:
    """The object whose `decode(ids, skip_special_tokens=...)` gives the same text cheapest.

    A transformers fast tokenizer's `decode` converts its input, dispatches on batches and
    may clean up spaces before calling the Rust tokenizer it wraps; when the clean-up is off
    and nothing overrides the library's decode path, the result is exactly the Rust
    tokenizer's, at a fraction of the per-call cost (detokenization runs once per token of
    every streaming request).
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return tokenizer
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - transformers' fast tokenizers need it
        return tokenizer
    cls = type(tokenizer)
    if (
        isinstance(backend, Tokenizer)
        and _defining_module(cls, "_decode") in _FAST_DECODE_MODULES
        and _defining_module(cls, "decode") == "transformers.tokenization_utils_base"
    ):
        return backend
    return tokenizer


class StopMatcher:
    """Every stop string of a request in one Aho-Corasick automaton over characters.

    Fed the decoded text a character at a time (each character once, O(1) amortised), its
    state says both whether a stop string ends here (`match[state]`: the longest one that
    does) and how much of the text's tail could still begin one (`depth[state]`: the text to
    hold back). The former scan searched for every stop string and tried every tail length
    against every stop at each token, k x L^2 work per token (issue 20). Built once per set of
    stop strings (`stop_matcher` caches them) in time linear in their total length, which
    `SamplingParams` bounds.
    """

    __slots__ = ("goto", "fail", "depth", "match")

    def __init__(self, stops: tuple[str, ...]) -> None:
        goto: list[dict[str, int]] = [{}]
        depth = [0]
        match = [0]
        for stop in stops:
            state = 0
            for ch in stop:
                nxt = goto[state].get(ch)
                if nxt is None:
                    nxt = len(goto)
                    goto[state][ch] = nxt
                    goto.append({})
                    depth.append(depth[state] + 1)
                    match.append(0)
                state = nxt
            match[state] = len(stop)
        fail = [0] * len(goto)
        queue = list(goto[0].values())
        head = 0
        while head < len(queue):  # breadth first: a state's failure link is shallower
            state = queue[head]
            head += 1
            for ch, nxt in goto[state].items():
                queue.append(nxt)
                f = fail[state]
                while f and ch not in goto[f]:
                    f = fail[f]
                target = goto[f].get(ch, 0)
                fail[nxt] = target if target != nxt else 0
                if not match[nxt]:
                    match[nxt] = match[fail[nxt]]
        self.goto, self.fail, self.depth, self.match = goto, fail, depth, match

    def feed(self, state: int, text: str) -> tuple[int, int]:
        """Run `text` from `state`: (state after it, end offset in `text` of the first stop
        string completed, or -1). The stop that ends there is `match[state]` characters long."""
        goto, fail, match = self.goto, self.fail, self.match
        for offset, ch in enumerate(text):
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            if match[state]:
                return state, offset + 1
        return state, -1


@functools.lru_cache(maxsize=256)
def stop_matcher(stops: tuple[str, ...]) -> StopMatcher:
    """The automaton for a set of stop strings (requests often share theirs)."""
    return StopMatcher(stops)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, honouring stop strings.

    Works with a `tokenizers.Tokenizer` or a transformers tokenizer (both have
    `decode(ids, skip_special_tokens=...)`).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        self._tokenizer: _Decoder = fast_decoder(tokenizer)
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(s for s in stop if s)
        self._include_stop = include_stop_str_in_output
        self._matcher = stop_matcher(self._stop) if self._stop else None
        self._state = 0  # the matcher's state after `_decoded[:_scanned]`
        self._scanned = 0
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        # SamplingParams.min_tokens: as vLLM, a stop string ends the request only in text of
        # the tokens after the min_tokens-th (the generated tokens are _tokens past the context).
        self._min_tokens = min_tokens
        self._num_context = len(context)
        self._tokens: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._decoded = ""  # every character decoded so far (emitted or held back)
        self.text = ""  # what has been emitted: a prefix of _decoded without stop strings
        self.stopped = False
        self.stop_string: str | None = None

    @property
    def has_stop_strings(self) -> bool:
        """Whether `update` may report a stop string."""
        return bool(self._stop)

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _windows(self) -> tuple[list[int], list[int]]:
        """The two token windows to decode: already emitted, and up to the newest token."""
        return self._tokens[self._prefix_offset : self._read_offset], self._tokens[self._prefix_offset :]

    def _decode_new_tokens(self) -> str:
        """Text added by the tokens after read_offset; empty while it ends mid-character."""
        prefix_ids, full_ids = self._windows()
        return self._advance(self._decode(prefix_ids), self._decode(full_ids))

    def _advance(self, prefix_text: str, full_text: str) -> str:
        """Given the windows' texts, the new text (moving the offsets) or "" if incomplete."""
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        return full_text[len(prefix_text) :]

    def update(self, new_token_ids: list[int]) -> tuple[str, bool]:
        """Add generated tokens; return (text to emit now, whether a stop string was hit).

        After a stop string is hit, the request is over: later calls return ("", True).
        """
        if self.stopped:
            return "", True
        split = self._min_tokens_split(len(new_token_ids))
        if split:  # the tokens up to min_tokens first: no stop string can end in their text
            early, _ = self.update(new_token_ids[:split])
            delta, stopped = self.update(new_token_ids[split:])
            return early + delta, stopped
        self._tokens.extend(new_token_ids)
        self._decoded += self._decode_new_tokens()
        return self._emit()

    def _min_tokens_split(self, count: int) -> int:
        """How many of `count` new tokens complete min_tokens when the rest go past it (else 0)."""
        done = len(self._tokens) - self._num_context
        return self._min_tokens - done if self._stop and done < self._min_tokens < done + count else 0

    def _emit(self) -> tuple[str, bool]:
        emitted = len(self.text)
        matcher = self._matcher
        if matcher is not None:
            # Only characters not yet scanned go through the automaton; a stop string cannot
            # start inside the emitted text (what could begin one is held back).
            text = self._decoded[self._scanned :]
            state, end = matcher.feed(self._state, text)
            if end >= 0 and len(self._tokens) - self._num_context <= self._min_tokens:
                skipped = 0  # too early for stop strings: scan on past each one
                while end >= 0:
                    skipped += end
                    state, end = matcher.feed(state, text[skipped:])
            if end >= 0:
                stop_end = self._scanned + end
                pos = stop_end - matcher.match[state]
                delta = self._decoded[emitted : stop_end if self._include_stop else pos]
                self.text += delta
                self.stopped = True
                self.stop_string = self._decoded[pos:stop_end]
                return delta, True
            self._state, self._scanned = state, len(self._decoded)
            end = len(self._decoded)
            if not self._include_stop:  # hold back what could begin a stop string
                end = max(emitted, end - matcher.depth[state])
        else:
            end = len(self._decoded)
        delta = self._decoded[emitted:end]
        self.text += delta
        return delta, False

    def flush(self) -> str:
        """Emit whatever is held back (the request finished for a reason other than a stop
        string): an incomplete character and a would-be stop prefix."""
        if self.stopped:
            return ""
        prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._tokens[self._prefix_offset :])
        if len(full_text) > len(prefix_text):
            self._decoded += full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._tokens)
        delta = self._decoded[len(self.text) :]
        self.text += delta
        return delta


# len(decode([token_id])) per token id, for each (decoder, skip_special_tokens) in use: the
# "already emitted" window of a streaming request is a single token most steps, and only its
# length matters. A pure function of the tokenizer; each entry holds its decoder, so the id
# in its key cannot be reused while the entry exists.
_PREFIX_LENGTHS: dict[tuple[int, bool], tuple[Any, dict[int, int]]] = {}
_MAX_DECODERS = 8


def _prefix_lengths(decoder: Any, skip: bool) -> dict[int, int]:
    key = (id(decoder), skip)
    entry = _PREFIX_LENGTHS.get(key)
    if entry is None or entry[0] is not decoder:
        if len(_PREFIX_LENGTHS) >= _MAX_DECODERS:
            _PREFIX_LENGTHS.clear()
        entry = _PREFIX_LENGTHS[key] = (decoder, {})
    return entry[1]


def update_batch(
    detokenizers: Sequence[IncrementalDetokenizer], new_token_ids: Sequence[list[int]]
) -> list[tuple[str, bool]]:
    """`detokenizer.update(ids)` for each pair, in order, with the same results.

    Detokenizers sharing a Rust tokenizer (and `skip_special_tokens`) have all their windows
    decoded in one `decode_batch` call: one crossing into the tokenizer per step instead of
    two per request. The usual step (every request on one tokenizer, no stop strings) takes
    a fast path with the per-request bookkeeping inlined, and a single-token "emitted" window
    whose decoded length is known is not decoded again: this runs once per token of every
    streaming request.
    """
    if not detokenizers:
        return []
    first = detokenizers[0]
    decoder: Any = first._tokenizer
    skip = first._skip_special_tokens
    if hasattr(decoder, "decode_batch"):
        known = _prefix_lengths(decoder, skip)
        windows: list[list[int]] = []
        append = windows.append
        prefix_lengths: list[int] = []  # -1: the emitted window is decoded in this batch
        prefix_append = prefix_lengths.append
        for detok, ids in zip(detokenizers, new_token_ids, strict=True):
            if detok._tokenizer is not decoder or detok._skip_special_tokens is not skip or detok._stop or detok.stopped:
                break
            tokens = detok._tokens
            tokens.extend(ids)
            start = detok._prefix_offset
            read = detok._read_offset
            length = -1
            if read - start == 1:
                length = known.get(tokens[start], -1)
            elif read == start:
                length = 0
            prefix_append(length)
            if length < 0:
                append(tokens[start:read])
            append(tokens[start:])
        else:
            texts = decoder.decode_batch(windows, skip_special_tokens=skip)
            return _finish_plain_batch(detokenizers, prefix_lengths, texts, known)
        # Not the usual step: undo the extends done so far and take the general path.
        for index in range(len(prefix_lengths)):
            if new_token_ids[index]:
                del detokenizers[index]._tokens[-len(new_token_ids[index]) :]
    return _update_batch_general(detokenizers, new_token_ids)


def _finish_plain_batch(
    detokenizers: Sequence[IncrementalDetokenizer], prefix_lengths: list[int], texts: list[str], known: dict[int, int]
) -> list[tuple[str, bool]]:
    """`_advance` + `_emit` for detokenizers without stop strings, given their windows' texts
    (in order: each one's emitted window unless its length is in `prefix_lengths`, then its
    full window). Lengths of single-token windows decoded here are added to `known`.

    Without stop strings nothing is held back, so the decoded text is the emitted text:
    `text` and `_decoded` are one string, grown once per token.
    """
    results: list[tuple[str, bool]] = []
    append = results.append
    nothing = ("", False)
    replacement = _REPLACEMENT_CHAR
    cursor = 0
    for detok, prefix_len in zip(detokenizers, prefix_lengths, strict=True):
        if prefix_len < 0:
            prefix_len = len(texts[cursor])
            cursor += 1
            if detok._read_offset - detok._prefix_offset == 1:
                known[detok._tokens[detok._prefix_offset]] = prefix_len
        full_text = texts[cursor]
        cursor += 1
        if len(full_text) <= prefix_len or full_text.endswith(replacement):
            append(nothing)
            continue
        detok._prefix_offset = detok._read_offset
        detok._read_offset = len(detok._tokens)
        delta = full_text[prefix_len:]
        detok.text = detok._decoded = detok.text + delta
        append((delta, False))
    return results


def _update_batch_general(
    detokenizers: Sequence[IncrementalDetokenizer], new_token_ids: Sequence[list[int]]
) -> list[tuple[str, bool]]:
    """`update_batch` for any mix of tokenizers, stop strings and stopped detokenizers."""
    results: list[tuple[str, bool] | None] = [None] * len(detokenizers)
    groups: dict[tuple[int, bool], list[int]] = {}
    for index, detok in enumerate(detokenizers):
        if detok.stopped:
            results[index] = ("", True)
        elif hasattr(detok._tokenizer, "decode_batch") and not detok._min_tokens_split(len(new_token_ids[index])):
            groups.setdefault((id(detok._tokenizer), detok._skip_special_tokens), []).append(index)
        else:
            results[index] = detok.update(new_token_ids[index])
    for (_, skip), members in groups.items():
        windows: list[list[int]] = []
        for index in members:
            detok = detokenizers[index]
            detok._tokens.extend(new_token_ids[index])
            windows.extend(detok._windows())
        decoder: Any = detokenizers[members[0]]._tokenizer
        texts = decoder.decode_batch(windows, skip_special_tokens=skip)
        for slot, index in enumerate(members):
            detok = detokenizers[index]
            detok._decoded += detok._advance(texts[2 * slot], texts[2 * slot + 1])
            results[index] = detok._emit()
    return [r if r is not None else ("", True) for r in results]
