"""Structured output: grammar-constrained decoding with llguidance (issue 22).

A request asks for structured output with one `StructuredOutputSpec`: a JSON schema, any JSON
object, a regular expression, a choice among strings, or a grammar (Lark in llguidance's dialect,
or GBNF as llama.cpp writes it; llguidance tells them apart). The HTTP spellings map onto it by
pure functions: OpenAI's `response_format` (`spec_from_response_format`), vLLM's
`structured_outputs` (`spec_from_structured_outputs`) and its older `guided_*` fields
(`spec_from_guided_fields`); `spec_from_request` takes a whole request body and refuses two of
them at once.

Why llguidance (docs/STRUCTURED_OUTPUT.md has the numbers): its masks cost tens of
microseconds per token on CPU, it imports in 0.1 s without torch or transformers (xgrammar imports
both: 2 s, and the engine process deliberately has neither), it builds its tokenizer from the
`tokenizer.json` text the engine already has, and it refuses a JSON-schema keyword it cannot
enforce (strict mode) where xgrammar accepts `uniqueItems`, `not`, `if`/`then` and
`dependentRequired` and ignores them.

`GrammarCompiler` (one per tokenizer) compiles a spec into a matcher prototype, validating it:
a grammar problem raises `InvalidRequestError(field, message)` naming the request field and, for
a JSON-schema keyword llguidance cannot enforce, the keyword. Compiled prototypes live in a
bounded LRU cache keyed by the spec; `compile` is thread-safe and drops the GIL in llguidance,
so it can run with `anyio.to_thread.run_sync` off the event loop. `GrammarMatcher` is one
request's state: `fill_bitmask` writes the allowed next tokens, `accept` advances, `rollback`
undoes, `is_finished` says the grammar can take nothing more (the request ends with "stop").

Bitmask layout (what the worker applies): a row of `ceil(vocab_size / 32)` int32 words; bit `j`
(value `1 << j`, two's complement for j = 31) of word `i` set means token `32 * i + j` may be
sampled. A worker applies a row as
`logits.masked_fill_(~unpack(row)[:vocab], -inf)`, where unpack turns the words into bools
little-endian (`bitmask_to_bool` here is the numpy reference). The model's EOS ids are set exactly
when the grammar may end; token ids past the tokenizer's vocabulary (a padded embedding) are
never set.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from shardline.engine.errors import InvalidRequestError, ShardlineError

Kind = Literal["json", "json_object", "regex", "choice", "grammar"]
KINDS: tuple[Kind, ...] = ("json", "json_object", "regex", "choice", "grammar")
# A spec's text (schema, regex, grammar, choices) beyond this many characters is refused:
# compiling is superlinear in the worst case and runs in the engine's process.
MAX_SPEC_CHARS = 100_000
MAX_CHOICES = 1024
DEFAULT_CACHE_SIZE = 256


class GrammarStateError(ShardlineError, RuntimeError):
    """A matcher could not go on (a forbidden token was forced on it, or llguidance ran out of
    its per-step budget on a pathological grammar): the request must end with an error."""


@dataclasses.dataclass(frozen=True)
class StructuredOutputSpec:
    """What one request's output must match. Hashable: compiled grammars are cached by it.

    kind: "json" (value: the JSON schema as JSON text), "json_object" (any JSON object; value
    ""), "regex" (value: the pattern, Rust `regex` syntax; the whole output must match),
    "choice" (value: a JSON list of the strings; the output is exactly one of them), "grammar"
    (value: Lark in llguidance's dialect or a GBNF grammar).
    any_whitespace: JSON may carry whitespace between tokens (default: compact JSON, ", " never
    "  ,\\n"; small models otherwise loop on whitespace). whitespace_pattern: a regex for the
    whitespace JSON may carry (vLLM's `whitespace_pattern`), overriding both.
    field: the request field it came from, named in errors (not part of equality)."""

    kind: Kind
    value: str = ""
    any_whitespace: bool = False
    whitespace_pattern: str | None = None
    field: str = dataclasses.field(default="structured_outputs", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequestError(self.field, f"unknown structured output kind {self.kind!r}")
        if len(self.value) > MAX_SPEC_CHARS:
            raise InvalidRequestError(
                self.field,
                f"is {len(self.value)} characters long; at most {MAX_SPEC_CHARS} are accepted",
            )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def json(
        cls,
        schema: Mapping[str, Any] | str | bool,
        *,
        field: str = "structured_outputs.json",
        **options: Any,
    ) -> StructuredOutputSpec:
        """A JSON schema, as a dict (or `true`) or as its JSON text."""
        if isinstance(schema, str):
            try:
                parsed = json.loads(schema)
            except ValueError as exc:
                raise InvalidRequestError(field, f"is not valid JSON: {exc}") from None
        else:
            parsed = schema
        if not isinstance(parsed, (dict, bool)):
            raise InvalidRequestError(
                field, f"a JSON schema must be an object, got {type(parsed).__name__}"
            )
        try:
            text = json.dumps(parsed, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(field, f"is not JSON-serialisable: {exc}") from None
        return cls("json", text, field=field, **options)

    @classmethod
    def json_object(cls, *, field: str = "response_format", **options: Any) -> StructuredOutputSpec:
        return cls("json_object", "", field=field, **options)

    @classmethod
    def regex(
        cls, pattern: str, *, field: str = "structured_outputs.regex"
    ) -> StructuredOutputSpec:
        if not isinstance(pattern, str) or not pattern:
            raise InvalidRequestError(field, "must be a non-empty string (a regular expression)")
        return cls("regex", pattern, field=field)

    @classmethod
    def choice(
        cls, choices: Sequence[str], *, field: str = "structured_outputs.choice"
    ) -> StructuredOutputSpec:
        if isinstance(choices, str) or not isinstance(choices, Sequence) or not choices:
            raise InvalidRequestError(field, "must be a non-empty list of strings")
        if len(choices) > MAX_CHOICES:
            raise InvalidRequestError(
                field, f"has {len(choices)} entries; at most {MAX_CHOICES} are accepted"
            )
        for i, c in enumerate(choices):
            if not isinstance(c, str) or not c:
                raise InvalidRequestError(f"{field}[{i}]", f"must be a non-empty string, got {c!r}")
        return cls("choice", json.dumps(list(choices), ensure_ascii=False), field=field)

    @classmethod
    def grammar(
        cls, text: str, *, field: str = "structured_outputs.grammar"
    ) -> StructuredOutputSpec:
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequestError(field, "must be a non-empty string (a Lark or GBNF grammar)")
        return cls("grammar", text, field=field)


# ---------------------------------------------------------------------- request field mapping
def _mapping(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidRequestError(field, f"must be an object, got {type(value).__name__}")
    return value


def _refuse_unknown(value: Mapping[str, Any], known: Iterable[str], field: str) -> None:
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise InvalidRequestError(
            f"{field}.{unknown[0]}", "is not supported by shardline's structured output"
        )


def spec_from_response_format(
    value: Any, field: str = "response_format"
) -> StructuredOutputSpec | None:
    """OpenAI's `response_format`: {"type": "text"} (None), {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name", "description", "schema", "strict"}}.
    A json_schema without `schema` is any JSON object; `strict` false is still enforced (the
    output always matches the schema)."""
    if value is None:
        return None
    value = _mapping(value, field)
    kind = value.get("type")
    if kind == "text":
        _refuse_unknown(value, ("type",), field)
        return None
    if kind == "json_object":
        _refuse_unknown(value, ("type",), field)
        return StructuredOutputSpec.json_object(field=field)
    if kind == "json_schema":
        _refuse_unknown(value, ("type", "json_schema"), field)
        inner = _mapping(value.get("json_schema"), f"{field}.json_schema")
        _refuse_unknown(inner, ("name", "description", "schema", "strict"), f"{field}.json_schema")
        name = inner.get("name")
        if name is not None and not (
            isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name)
        ):
            raise InvalidRequestError(
                f"{field}.json_schema.name", "must be 1-64 letters, digits, underscores or dashes"
            )
        strict = inner.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise InvalidRequestError(
                f"{field}.json_schema.strict", f"must be a bool, got {strict!r}"
            )
        if "schema" not in inner or inner["schema"] is None:
            return StructuredOutputSpec.json_object(field=f"{field}.json_schema")
        return StructuredOutputSpec.json(inner["schema"], field=f"{field}.json_schema.schema")
    raise InvalidRequestError(
        f"{field}.type", f"must be one of 'text', 'json_object', 'json_schema'; got {kind!r}"
    )


_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")


def _whitespace_options(
    disable_any_whitespace: Any, pattern: Any, field: str, pattern_field: str
) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if disable_any_whitespace is not None:
        if not isinstance(disable_any_whitespace, bool):
            raise InvalidRequestError(field, f"must be a bool, got {disable_any_whitespace!r}")
        options["any_whitespace"] = not disable_any_whitespace
    if pattern is not None:
        if not isinstance(pattern, str) or not pattern:
            raise InvalidRequestError(pattern_field, "must be a non-empty string (a regex)")
        options["whitespace_pattern"] = pattern
    return options


def _build(kind: str, value: Any, field: str, options: dict[str, Any]) -> StructuredOutputSpec:
    if kind == "json":
        return StructuredOutputSpec.json(value, field=field, **options)
    if kind == "json_object":
        if value is not True:
            raise InvalidRequestError(field, f"must be true when given, got {value!r}")
        return StructuredOutputSpec.json_object(field=field, **options)
    if options:
        raise InvalidRequestError(field, "whitespace options apply to JSON constraints only")
    if kind == "regex":
        return StructuredOutputSpec.regex(value, field=field)
    if kind == "choice":
        return StructuredOutputSpec.choice(value, field=field)
    return StructuredOutputSpec.grammar(value, field=field)


def spec_from_structured_outputs(
    value: Any, field: str = "structured_outputs"
) -> StructuredOutputSpec | None:
    """vLLM's `structured_outputs`: exactly one of json, regex, choice, grammar, json_object,
    plus `disable_any_whitespace`, `whitespace_pattern` and `disable_fallback` (honoured
    trivially: there is no fallback backend). `structural_tag` and
    `disable_additional_properties` are refused."""
    if value is None:
        return None
    value = _mapping(value, field)
    _refuse_unknown(
        value,
        (*_CONSTRAINTS, "disable_any_whitespace", "whitespace_pattern", "disable_fallback"),
        field,
    )
    given = [k for k in _CONSTRAINTS if value.get(k) is not None]
    if len(given) != 1:
        raise InvalidRequestError(
            field, f"needs exactly one of {', '.join(_CONSTRAINTS)}; got {given or 'none'}"
        )
    fallback = value.get("disable_fallback")
    if fallback is not None and not isinstance(fallback, bool):
        raise InvalidRequestError(f"{field}.disable_fallback", f"must be a bool, got {fallback!r}")
    options = _whitespace_options(
        value.get("disable_any_whitespace"),
        value.get("whitespace_pattern"),
        f"{field}.disable_any_whitespace",
        f"{field}.whitespace_pattern",
    )
    return _build(given[0], value[given[0]], f"{field}.{given[0]}", options)


GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
GUIDED_OPTIONS = ("guided_whitespace_pattern", "guided_decoding_backend")
# Backend names a request may ask for: llguidance is the one in use.
ACCEPTED_BACKENDS = ("auto", "guidance", "llguidance")


def spec_from_guided_fields(body: Mapping[str, Any]) -> StructuredOutputSpec | None:
    """vLLM's older top-level `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`
    (with `guided_whitespace_pattern`; `guided_decoding_backend` must name llguidance or auto).
    `guided_json` may be a schema or a JSON string."""
    given = [k for k in GUIDED_FIELDS if body.get(k) is not None]
    backend = body.get("guided_decoding_backend")
    if backend is not None and backend not in ACCEPTED_BACKENDS:
        raise InvalidRequestError(
            "guided_decoding_backend",
            f"shardline decodes with llguidance; got {backend!r} (accepted: "
            f"{', '.join(ACCEPTED_BACKENDS)})",
        )
    if len(given) > 1:
        raise InvalidRequestError(
            given[1], f"only one guided_* constraint per request; got {given}"
        )
    pattern = body.get("guided_whitespace_pattern")
    if not given:
        if pattern is not None:
            raise InvalidRequestError("guided_whitespace_pattern", "applies only with guided_json")
        return None
    options = _whitespace_options(
        None, pattern, "guided_whitespace_pattern", "guided_whitespace_pattern"
    )
    return _build(given[0][len("guided_") :], body[given[0]], given[0], options)


def spec_from_request(body: Mapping[str, Any]) -> StructuredOutputSpec | None:
    """The spec a request body asks for (chat or completions), from whichever of
    `response_format`, `structured_outputs` and `guided_*` it uses; two at once are refused."""
    specs = [
        (name, spec)
        for name, spec in (
            ("response_format", spec_from_response_format(body.get("response_format"))),
            ("structured_outputs", spec_from_structured_outputs(body.get("structured_outputs"))),
            ("guided_*", spec_from_guided_fields(body)),
        )
        if spec is not None
    ]
    if len(specs) > 1:
        raise InvalidRequestError(
            specs[1][0], f"asks for structured output already given by {specs[0][0]}; send one"
        )
    return specs[0][1] if specs else None


# ---------------------------------------------------------------------- compiling
def _llg_grammar(spec: StructuredOutputSpec) -> str:
    """The llguidance grammar text for a spec (not yet validated)."""
    import llguidance

    if spec.kind in ("json", "json_object"):
        options: Any = {"whitespace_flexible": spec.any_whitespace}  # llguidance.JsonCompileOptions
        if spec.whitespace_pattern is not None:
            options["whitespace_pattern"] = spec.whitespace_pattern
        schema = spec.value if spec.kind == "json" else '{"type":"object"}'
        # lenient=False (also over a schema's own "x-guidance"): an unimplemented keyword is an
        # error, never dropped.
        return llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults=options, overrides={"lenient": False}
        )
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "choice":
        # Alternatives of literal strings (JSON string syntax is Lark's string-literal syntax).
        return llguidance.grammar_from("choice", spec.value)
    try:
        return llguidance.grammar_from("grammar", spec.value)
    except ValueError as exc:  # GBNF that does not convert
        raise InvalidRequestError(spec.field, str(exc)) from None


_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[(.*?)\]")


def describe_error(spec: StructuredOutputSpec, error: str) -> str:
    """llguidance's error as a message for the caller: an unimplemented JSON-schema keyword is
    named as a feature structured output cannot enforce."""
    error = error.strip()
    found = _UNIMPLEMENTED.search(error)
    if found:
        keys = [k.strip().strip('"') for k in found.group(1).split(",") if k.strip()]
        listed = ", ".join(repr(k) for k in keys)
        return (
            f"the JSON schema uses {listed}, which structured output cannot enforce "
            f"(unsupported JSON-schema feature{'s' if len(keys) > 1 else ''}: {listed})"
        )
    if "oneOf constraints are not supported" in error:
        return (
            "the JSON schema uses 'oneOf' with alternatives that can match the same value, which "
            "structured output cannot enforce (unsupported JSON-schema feature: overlapping 'oneOf'; "
            "use 'anyOf')"
        )
    what = {
        "json": "JSON schema",
        "json_object": "JSON object grammar",
        "regex": "regular expression",
        "choice": "choice",
        "grammar": "grammar",
    }[spec.kind]
    return f"the {what} cannot be used for structured output: {error}"


@dataclasses.dataclass(frozen=True)
class CompiledGrammar:
    """A validated grammar: a fresh llguidance matcher that every request's matcher copies."""

    spec: StructuredOutputSpec
    prototype: Any  # llguidance.LLMatcher in its initial state; never advanced


class GrammarCompiler:
    """Compiles specs for one tokenizer, with a bounded LRU cache keyed by spec.

    `tokenizer` is the tokenizer.json text, the engine's `FastTokenizer`, or a transformers fast
    tokenizer; `eos_token_ids` are the model's EOS ids (allowed exactly when a grammar may end);
    `vocab_size` is the width of the model's logits (>= the tokenizer's vocabulary; the mask
    covers it). Thread-safe: `compile` may run on worker threads."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        eos_token_ids: Iterable[int],
        vocab_size: int | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        import llguidance

        eos = sorted(set(eos_token_ids))
        if not eos:
            raise ValueError("structured output needs the model's EOS token id(s)")
        self._llg_tokenizer = llguidance.LLTokenizer(
            _tokenizer_json(tokenizer), n_vocab=vocab_size, eos_token=eos
        )
        self.vocab_size = int(self._llg_tokenizer.vocab_size)
        self.num_words = (self.vocab_size + 31) // 32
        self.eos_token_ids = tuple(eos)
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[StructuredOutputSpec, CompiledGrammar] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def cached(self, spec: StructuredOutputSpec) -> CompiledGrammar | None:
        """The compiled grammar for `spec` if the cache holds it (counts as a hit), else None:
        what an event loop may ask without compiling."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                self.hits += 1
            return hit

    def compile(self, spec: StructuredOutputSpec) -> CompiledGrammar:
        """The compiled grammar for `spec` (cached). Raises InvalidRequestError naming
        `spec.field` when the grammar is invalid or uses what llguidance cannot enforce."""
        hit = self.cached(spec)
        if hit is not None:
            return hit
        import llguidance

        try:
            grammar = _llg_grammar(spec)
        except ValueError as exc:
            raise InvalidRequestError(spec.field, describe_error(spec, str(exc))) from None
        prototype = llguidance.LLMatcher(self._llg_tokenizer, grammar, log_level=0)
        if prototype.is_error():
            raise InvalidRequestError(spec.field, describe_error(spec, prototype.get_error()))
        compiled = CompiledGrammar(spec, prototype)
        with self._lock:
            self.misses += 1
            self._cache[spec] = compiled
            self._cache.move_to_end(spec)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: StructuredOutputSpec) -> GrammarMatcher:
        """A new request's matcher (compiling or taking the cached grammar)."""
        return GrammarMatcher(self.compile(spec), self)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)


def _tokenizer_json(tokenizer: Any) -> str:
    """The tokenizers-library JSON of a tokenizer, without padding or truncation."""
    if isinstance(tokenizer, str):
        return tokenizer
    backend = getattr(tokenizer, "backend", None) or getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise ValueError(
            f"structured output needs a fast (tokenizers-library) tokenizer; "
            f"{type(tokenizer).__name__} is not one"
        )
    backend = copy.copy(backend)
    backend.no_padding()
    backend.no_truncation()
    return str(backend.to_str())


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, compiled: CompiledGrammar, compiler: GrammarCompiler) -> None:
        self.spec = compiled.spec
        self._m = compiled.prototype.deep_copy()
        self.vocab_size = compiler.vocab_size
        self.num_words = compiler.num_words
        self.eos_token_ids = compiler.eos_token_ids
        self.num_accepted = 0  # tokens accepted so far (what rollback can undo)
        self._eos_at: int | None = None  # num_accepted once an EOS was accepted

    def fill_bitmask(self, out: np.ndarray) -> None:
        """Write the allowed next tokens into `out`, a C-contiguous int32 row of `num_words`
        words (the layout in the module docstring). Raises GrammarStateError if the matcher
        cannot go on."""
        if (
            out.dtype != np.int32
            or out.ndim != 1
            or out.shape[0] != self.num_words
            or not out.flags["C_CONTIGUOUS"]
        ):
            raise ValueError(
                f"the bitmask row must be C-contiguous int32 of shape ({self.num_words},)"
            )
        self._check()
        self._m.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
        self._check()

    def accept(self, token_ids: Sequence[int]) -> bool:
        """Advance over `token_ids` (sampled tokens; an EOS may come last, when the grammar may
        end). If any is forbidden, return False and stay where it was (the state before the
        call). After an EOS nothing more is accepted."""
        tokens = list(token_ids)
        if self._eos_at is not None:
            return not tokens
        ends = bool(tokens) and tokens[-1] in self.eos_token_ids
        body = tokens[:-1] if ends else tokens
        if any(t in self.eos_token_ids for t in body):
            return False
        consumed = self._m.try_consume_tokens(body)
        if consumed < len(body) or (ends and not self._m.is_accepting()):
            if consumed:
                self._m.rollback(consumed)
            return False
        self.num_accepted += len(tokens)
        if ends:  # kept here, not in llguidance (a stopped llguidance matcher refuses an EOS)
            self._eos_at = self.num_accepted
        self._check()
        return True

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (speculative decoding, recompute)."""
        if not 0 <= num_tokens <= self.num_accepted:
            raise ValueError(
                f"cannot roll back {num_tokens} of {self.num_accepted} accepted tokens"
            )
        in_llg = num_tokens
        if self._eos_at is not None and num_tokens:
            self._eos_at, in_llg = None, num_tokens - 1
        if in_llg and not self._m.rollback(in_llg):
            raise GrammarStateError(self._m.get_error() or "rollback failed")
        self.num_accepted -= num_tokens

    def reset(self) -> None:
        """Back to the start (a request recomputed from its prompt)."""
        self.rollback(self.num_accepted)

    def can_end(self) -> bool:
        """The output so far is complete: an EOS may come next."""
        return bool(self._m.is_accepting())

    def is_finished(self) -> bool:
        """The grammar takes nothing more (only EOS would be allowed): the request ends with
        finish_reason "stop" without sampling again."""
        return self._eos_at is not None or bool(self._m.is_stopped())

    def validate(self, token_ids: Sequence[int]) -> int:
        """How many of `token_ids` could be accepted from here (nothing changes)."""
        return int(self._m.validate_tokens(list(token_ids)))

    def _check(self) -> None:
        if self._m.is_error():
            raise GrammarStateError(f"structured output stopped: {self._m.get_error()}")


# ---------------------------------------------------------------------- bitmask helpers
def allocate_bitmask(batch_size: int, vocab_size: int) -> np.ndarray:
    """A (batch_size, ceil(vocab/32)) int32 bitmask, every token allowed (-1 = all 32 bits):
    the rows of unconstrained requests stay like this."""
    return np.full((batch_size, (vocab_size + 31) // 32), -1, dtype=np.int32)


def bitmask_to_bool(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """The numpy reference of the layout: bool[..., vocab_size], True where allowed."""
    words = np.ascontiguousarray(bitmask, dtype=np.int32)
    bits = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
    return bits[..., :vocab_size].astype(bool)


def apply_bitmask(logits: np.ndarray, bitmask: np.ndarray) -> None:
    """numpy reference of what the worker does with torch: forbidden logits become -inf, in
    place (logits: float[batch, vocab]; bitmask: int32[batch, words])."""
    allowed = bitmask_to_bool(bitmask, logits.shape[-1])
    logits[~allowed] = -np.inf
