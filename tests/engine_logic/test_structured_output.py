"""Structured output (issue 22, phase 1): specs from request fields, compiling with llguidance,
and matchers driven by random walks over the default model's real tokenizer.

Every walk picks tokens only where the matcher's bitmask allows them; its text must parse and
validate with `jsonschema` (a different implementation than the one constraining it)."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
from typing import Any

import jsonschema
import numpy as np
import pytest

from shardline.engine.errors import InvalidRequestError
from shardline.engine.structured_output import (
    GrammarCompiler,
    GrammarMatcher,
    StructuredOutputSpec,
    allocate_bitmask,
    apply_bitmask,
    bitmask_to_bool,
    spec_from_guided_fields,
    spec_from_request,
    spec_from_response_format,
    spec_from_structured_outputs,
)
from support.json_schemas import COVERAGE_PROBES, SCHEMAS, WalkVocab, random_walk

EOS = 2  # SmolLM2-Instruct's <|im_end|> (the `compiler` and `tokenizer` fixtures: conftest.py)


@pytest.fixture(scope="module")
def vocab(tokenizer: Any, compiler: GrammarCompiler) -> WalkVocab:
    return WalkVocab([tokenizer.decode([i]) for i in range(compiler.vocab_size)])


def walk_text(matcher: GrammarMatcher, tokenizer: Any, vocab: WalkVocab, seed: int) -> str:
    tokens = random_walk(
        matcher.fill_bitmask,
        lambda t: matcher.accept([t]),
        [EOS],
        vocab,
        np.random.default_rng(seed),
    )
    assert tokens[-1] == EOS and matcher.is_finished()
    return str(tokenizer.decode(tokens[:-1]))


def test_the_suite_has_at_least_20_schemas_with_the_required_features() -> None:
    assert len(SCHEMAS) >= 20
    text = json.dumps([s for _, s in SCHEMAS])
    for keyword in (
        "minItems",
        "maxItems",
        "enum",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "pattern",
        "anyOf",
        "$ref",
        '"additionalProperties": false',
        '"type": "number"',
        "required",
    ):
        assert keyword in text, keyword


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("name", "schema"), SCHEMAS, ids=[n for n, _ in SCHEMAS])
def test_every_walk_under_a_schema_validates(
    name: str,
    schema: dict[str, Any],
    seed: int,
    compiler: GrammarCompiler,
    tokenizer: Any,
    vocab: WalkVocab,
) -> None:
    text = walk_text(compiler.matcher(StructuredOutputSpec.json(schema)), tokenizer, vocab, seed)
    jsonschema.Draft202012Validator(schema).validate(json.loads(text))


@pytest.mark.parametrize("seed", range(4))
def test_json_object_walks_give_json_objects(
    seed: int, compiler: GrammarCompiler, tokenizer: Any, vocab: WalkVocab
) -> None:
    text = walk_text(compiler.matcher(StructuredOutputSpec.json_object()), tokenizer, vocab, seed)
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize(
    "pattern",
    [
        r"[0-9]{3}-[0-9]{4}",
        r"(yes|no|maybe)!?",
        r"[A-Z][a-z]{1,8}( [A-Z][a-z]{1,8})?",
        r"\d+(\.\d{1,2})?",
        r"#[0-9a-f]{6}",
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regex_walks_match(
    pattern: str, seed: int, compiler: GrammarCompiler, tokenizer: Any, vocab: WalkVocab
) -> None:
    text = walk_text(compiler.matcher(StructuredOutputSpec.regex(pattern)), tokenizer, vocab, seed)
    assert re.fullmatch(pattern, text), text


@pytest.mark.parametrize("seed", range(6))
def test_choice_walks_give_one_of_the_choices(
    seed: int, compiler: GrammarCompiler, tokenizer: Any, vocab: WalkVocab
) -> None:
    choices = [
        "positive",
        "negative",
        "neutral",
        'quote " and \\ back',
        "naïve ✓",
        "two\nlines",
        "pos",
    ]
    text = walk_text(compiler.matcher(StructuredOutputSpec.choice(choices)), tokenizer, vocab, seed)
    assert text in choices


def test_a_lark_and_a_gbnf_grammar_are_both_accepted(
    compiler: GrammarCompiler, tokenizer: Any, vocab: WalkVocab
) -> None:
    lark = 'start: "ID-" /[0-9]{2}/ ("/" /[a-z]{3}/)?'
    gbnf = 'root ::= "ID-" [0-9] [0-9] ("/" [a-z] [a-z] [a-z])?'
    for grammar in (lark, gbnf):
        for seed in range(3):
            text = walk_text(
                compiler.matcher(StructuredOutputSpec.grammar(grammar)), tokenizer, vocab, seed
            )
            assert re.fullmatch(r"ID-[0-9]{2}(/[a-z]{3})?", text), (grammar, text)


@pytest.mark.parametrize(
    "feature", ["uniqueItems", "not", "if/then/else", "contains", "dependentRequired"]
)
def test_a_schema_feature_llguidance_cannot_enforce_is_refused_by_name(
    feature: str, compiler: GrammarCompiler
) -> None:
    spec = StructuredOutputSpec.json(
        COVERAGE_PROBES[feature], field="response_format.json_schema.schema"
    )
    with pytest.raises(InvalidRequestError) as info:
        compiler.compile(spec)
    assert info.value.field == "response_format.json_schema.schema"
    for keyword in feature.split("/"):
        assert f"'{keyword}'" in info.value.message
    assert "cannot enforce" in info.value.message


def test_unsupported_keyword_deep_inside_a_schema_is_refused(compiler: GrammarCompiler) -> None:
    schema = {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}},
    }
    with pytest.raises(InvalidRequestError, match="uniqueItems"):
        compiler.compile(StructuredOutputSpec.json(schema))


def test_overlapping_one_of_is_refused_not_approximated(compiler: GrammarCompiler) -> None:
    with pytest.raises(InvalidRequestError, match="oneOf"):
        compiler.compile(
            StructuredOutputSpec.json({"oneOf": [{"type": "integer"}, {"type": "number"}]})
        )


def test_a_schema_x_guidance_cannot_turn_on_lenient_mode(compiler: GrammarCompiler) -> None:
    schema = {"type": "array", "uniqueItems": True, "x-guidance": {"lenient": True}}
    with pytest.raises(InvalidRequestError, match="uniqueItems"):
        compiler.compile(StructuredOutputSpec.json(schema))


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        (
            lambda: StructuredOutputSpec.regex("(unclosed", field="guided_regex"),
            "guided_regex",
            "unclosed group",
        ),
        (
            lambda: StructuredOutputSpec.grammar(
                "start: undefined_rule", field="structured_outputs.grammar"
            ),
            "structured_outputs.grammar",
            "undefined_rule",
        ),
        (lambda: StructuredOutputSpec.json({"type": "strin"}), "structured_outputs.json", "strin"),
        (
            lambda: StructuredOutputSpec.json({"type": "string", "format": "bogus"}),
            "structured_outputs.json",
            "bogus",
        ),
        (
            lambda: StructuredOutputSpec.json({"$ref": "#/$defs/missing"}),
            "structured_outputs.json",
            "missing",
        ),
    ],
)
def test_invalid_grammars_name_the_field(
    spec: Any, field: str, words: str, compiler: GrammarCompiler
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        compiler.compile(spec())
    assert info.value.field == field
    assert words in info.value.message


def test_spec_construction_refuses_bad_values() -> None:
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        StructuredOutputSpec.json("{not json")
    with pytest.raises(InvalidRequestError, match="must be an object"):
        StructuredOutputSpec.json("[1, 2]")
    with pytest.raises(InvalidRequestError, match="non-empty list"):
        StructuredOutputSpec.choice([])
    with pytest.raises(InvalidRequestError) as info:
        StructuredOutputSpec.choice(["a", 3])  # type: ignore[list-item]
    assert info.value.field == "structured_outputs.choice[1]"
    with pytest.raises(InvalidRequestError, match="non-empty string"):
        StructuredOutputSpec.regex("")
    with pytest.raises(InvalidRequestError, match="at most"):
        StructuredOutputSpec.regex("a" * 100_001)


def test_eos_is_allowed_exactly_when_the_grammar_may_end(
    compiler: GrammarCompiler, tokenizer: Any
) -> None:
    m = compiler.matcher(
        StructuredOutputSpec.json({"type": "integer", "minimum": 0, "maximum": 500})
    )
    row = np.zeros(compiler.num_words, dtype=np.int32)
    seen_end = False
    for token in tokenizer.encode("42", add_special_tokens=False).ids:
        m.fill_bitmask(row)
        assert bitmask_to_bool(row, compiler.vocab_size)[EOS] == m.can_end()
        assert m.accept([token])
    m.fill_bitmask(row)
    allowed = bitmask_to_bool(row, compiler.vocab_size)
    assert m.can_end() and allowed[EOS] and not m.is_finished()  # "42" may go on to "420"
    seen_end = True
    assert m.accept([EOS]) and m.is_finished()
    assert seen_end


def test_a_forbidden_token_is_refused_and_changes_nothing(
    compiler: GrammarCompiler, tokenizer: Any
) -> None:
    m = compiler.matcher(
        StructuredOutputSpec.json(
            {
                "type": "object",
                "properties": {"a": {"type": "integer"}},
                "required": ["a"],
                "additionalProperties": False,
            }
        )
    )
    assert m.accept(tokenizer.encode('{"a":', add_special_tokens=False).ids)
    before = np.zeros(compiler.num_words, dtype=np.int32)
    m.fill_bitmask(before)
    letters = tokenizer.encode(
        "1x", add_special_tokens=False
    ).ids  # a digit, then a forbidden letter
    assert not m.accept(letters)
    assert not m.accept([EOS])
    after = np.zeros(compiler.num_words, dtype=np.int32)
    m.fill_bitmask(after)
    assert np.array_equal(before, after)
    assert m.accept(tokenizer.encode("7}", add_special_tokens=False).ids) and m.can_end()


def test_rollback_returns_to_the_earlier_mask(compiler: GrammarCompiler, tokenizer: Any) -> None:
    m = compiler.matcher(StructuredOutputSpec.json(SCHEMAS[0][1]))
    ids = tokenizer.encode('{"name":"Bo","age":3', add_special_tokens=False).ids
    masks = []
    for token in ids:
        row = np.zeros(compiler.num_words, dtype=np.int32)
        m.fill_bitmask(row)
        masks.append(row)
        assert m.accept([token])
    m.rollback(3)
    row = np.zeros(compiler.num_words, dtype=np.int32)
    m.fill_bitmask(row)
    assert np.array_equal(row, masks[len(ids) - 3])
    with pytest.raises(ValueError, match="cannot roll back"):
        m.rollback(len(ids))
    m.reset()
    m.fill_bitmask(row)
    assert np.array_equal(row, masks[0])


def test_matchers_from_one_compiled_grammar_are_independent(
    compiler: GrammarCompiler, tokenizer: Any
) -> None:
    spec = StructuredOutputSpec.choice(["alpha", "beta"])
    a, b = compiler.matcher(spec), compiler.matcher(spec)
    assert a.accept(tokenizer.encode("alpha", add_special_tokens=False).ids) and a.is_finished()
    assert not b.is_finished() and b.accept(tokenizer.encode("beta", add_special_tokens=False).ids)


def test_the_cache_is_keyed_by_spec_and_bounded(smollm2_dir: pathlib.Path) -> None:
    small = GrammarCompiler(
        (smollm2_dir / "tokenizer.json").read_text(), eos_token_ids=[EOS], cache_size=2
    )
    first = small.compile(StructuredOutputSpec.json({"type": "integer"}, field="a"))
    assert (
        small.compile(StructuredOutputSpec.json('{"type": "integer"}', field="b")) is first
    )  # field not in key
    assert small.hits == 1 and small.misses == 1
    small.compile(StructuredOutputSpec.regex("x+"))
    small.compile(StructuredOutputSpec.regex("y+"))
    assert len(small) == 2
    assert small.compile(StructuredOutputSpec.json({"type": "integer"})) is not first  # evicted
    ordered = StructuredOutputSpec.json({"b": 1, "a": 2})
    assert ordered != StructuredOutputSpec.json(
        {"a": 2, "b": 1}
    )  # property order is generation order


def test_the_engine_tokenizer_and_a_padded_vocabulary(smollm2_dir: pathlib.Path) -> None:
    from shardline.engine.tokenizer import load_tokenizer

    padded = GrammarCompiler(
        load_tokenizer(smollm2_dir), eos_token_ids=[EOS], vocab_size=49152 + 64
    )
    assert padded.vocab_size == 49152 + 64 and padded.num_words == (49152 + 64) // 32
    row = np.zeros(padded.num_words, dtype=np.int32)
    padded.matcher(StructuredOutputSpec.json_object()).fill_bitmask(row)
    allowed = bitmask_to_bool(row, padded.vocab_size)
    assert allowed.any() and not allowed[49152:].any()
    with pytest.raises(ValueError, match="C-contiguous int32"):
        padded.matcher(StructuredOutputSpec.json_object()).fill_bitmask(
            np.zeros(10, dtype=np.int32)
        )
    with pytest.raises(ValueError, match="fast"):
        GrammarCompiler(object(), eos_token_ids=[EOS])
    with pytest.raises(ValueError, match="EOS"):
        GrammarCompiler(load_tokenizer(smollm2_dir), eos_token_ids=[])


def test_bitmask_layout_and_the_numpy_reference_application() -> None:
    mask = allocate_bitmask(2, 70)
    assert mask.shape == (2, 3) and mask.dtype == np.int32 and bitmask_to_bool(mask, 70).all()
    mask[1] = 0
    mask[1, 0] = 1 << 5  # token 5
    mask[1, 2] = np.int32(-(1 << 31)) | (
        1 << 1
    )  # bit 31 of word 2: token 95 (past vocab); bit 1: token 65
    logits = np.zeros((2, 70), dtype=np.float32)
    apply_bitmask(logits, mask)
    assert np.isfinite(logits[0]).all()
    assert np.flatnonzero(np.isfinite(logits[1])).tolist() == [5, 65]


def test_compiling_imports_neither_torch_nor_transformers(smollm2_dir: pathlib.Path) -> None:
    code = (
        "import sys, numpy as np; from shardline.engine.structured_output import GrammarCompiler, "
        "StructuredOutputSpec; from shardline.engine.tokenizer import load_tokenizer; "
        f"c = GrammarCompiler(load_tokenizer({str(smollm2_dir)!r}), eos_token_ids=[2]); "
        "m = c.matcher(StructuredOutputSpec.json({'type': 'object'})); "
        "m.fill_bitmask(np.zeros(c.num_words, dtype=np.int32)); "
        "print(sorted(x for x in ('torch', 'transformers') if x in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ---------------------------------------------------------------------- request field mapping
def test_openai_response_format() -> None:
    assert spec_from_response_format(None) is None
    assert spec_from_response_format({"type": "text"}) is None
    assert spec_from_response_format({"type": "json_object"}) == StructuredOutputSpec.json_object()
    spec = spec_from_response_format(
        {
            "type": "json_schema",
            "json_schema": {
                "name": "person",
                "strict": True,
                "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
            },
        }
    )
    assert (
        spec is not None
        and spec.kind == "json"
        and json.loads(spec.value)["properties"]["a"] == {"type": "string"}
    )
    assert spec.field == "response_format.json_schema.schema"
    no_schema = spec_from_response_format({"type": "json_schema", "json_schema": {"name": "x"}})
    assert no_schema is not None and no_schema.kind == "json_object"


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_object", "schema": {}}, "response_format.schema"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}},
            "response_format.json_schema.name",
        ),
        (
            {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}},
            "response_format.json_schema.strict",
        ),
        (
            {"type": "json_schema", "json_schema": {"schema": {}, "extra": 1}},
            "response_format.json_schema.extra",
        ),
        (
            {"type": "json_schema", "json_schema": {"schema": [1]}},
            "response_format.json_schema.schema",
        ),
        ("json", "response_format"),
    ],
)
def test_bad_response_formats_name_the_field(value: Any, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        spec_from_response_format(value)
    assert info.value.field == field


def test_vllm_structured_outputs_and_guided_fields_agree() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    pairs = [
        ({"json": schema}, {"guided_json": schema}),
        ({"json": json.dumps(schema)}, {"guided_json": json.dumps(schema)}),
        ({"regex": "a+b"}, {"guided_regex": "a+b"}),
        ({"choice": ["x", "y"]}, {"guided_choice": ["x", "y"]}),
        ({"grammar": 'start: "a"'}, {"guided_grammar": 'start: "a"'}),
    ]
    for new, old in pairs:
        a, b = spec_from_structured_outputs(new), spec_from_guided_fields(old)
        assert a is not None and a == b
        assert spec_from_request({"structured_outputs": new}) == spec_from_request(old) == a
    assert spec_from_structured_outputs({"json_object": True}) == StructuredOutputSpec.json_object()
    loose = spec_from_structured_outputs({"json": schema, "disable_any_whitespace": False})
    assert loose is not None and loose.any_whitespace
    patterned = spec_from_guided_fields({"guided_json": schema, "guided_whitespace_pattern": " ?"})
    assert patterned is not None and patterned.whitespace_pattern == " ?"
    assert spec_from_guided_fields(
        {"guided_decoding_backend": "auto", "guided_regex": "a"}
    ) == StructuredOutputSpec.regex("a")
    assert spec_from_request({"messages": []}) is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
        (
            {"structured_outputs": {"json": {}, "disable_additional_properties": True}},
            "structured_outputs.disable_additional_properties",
        ),
        (
            {"structured_outputs": {"regex": "a", "disable_any_whitespace": True}},
            "structured_outputs.regex",
        ),
        ({"structured_outputs": {"json_object": False}}, "structured_outputs.json_object"),
        (
            {"structured_outputs": {"json": {}, "disable_fallback": "no"}},
            "structured_outputs.disable_fallback",
        ),
        ({"guided_json": {}, "guided_regex": "a"}, "guided_regex"),
        ({"guided_regex": "a", "guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
        ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
        ({"guided_choice": "yes"}, "guided_choice"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_*"),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
        ),
    ],
)
def test_conflicting_or_unsupported_request_fields_are_refused(
    body: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        spec_from_request(body)
    assert info.value.field == field
