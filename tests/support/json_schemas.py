"""A suite of JSON schemas covering what structured output must enforce (issue 22): nested
objects, arrays with bounds, enums, integer and number bounds, string patterns and lengths,
formats, anyOf / oneOf / allOf, $ref / $defs, additionalProperties false, required.

Shared by tests/engine_logic/test_structured_output.py (every random walk under each schema must
validate with `jsonschema`) and benchmarks/structured_output_masks.py (compile time and per-token
mask cost over the same schemas).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

_ADDRESS = {
    "type": "object",
    "properties": {
        "street": {"type": "string", "maxLength": 30},
        "city": {"type": "string", "minLength": 1, "maxLength": 20},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
    },
    "required": ["street", "city", "zip"],
    "additionalProperties": False,
}

SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    (
        "flat_object",
        {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
            "required": ["name", "age"],
        },
    ),
    (
        "nested_objects",
        {
            "type": "object",
            "properties": {
                "user": {
                    "type": "object",
                    "properties": {"id": {"type": "integer"}, "address": _ADDRESS},
                    "required": ["id", "address"],
                    "additionalProperties": False,
                },
            },
            "required": ["user"],
            "additionalProperties": False,
        },
    ),
    (
        "array_bounds",
        {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "minItems": 2,
            "maxItems": 4,
        },
    ),
    (
        "array_of_objects",
        {
            "type": "object",
            "properties": {
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                            "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                        },
                        "required": ["sku", "qty"],
                        "additionalProperties": False,
                    },
                    "minItems": 1,
                    "maxItems": 3,
                },
            },
            "required": ["items"],
            "additionalProperties": False,
        },
    ),
    ("string_enum", {"type": "string", "enum": ["red", "green", "blue"]}),
    ("mixed_enum", {"enum": ["auto", 1, 2.5, True, None]}),
    (
        "const",
        {
            "type": "object",
            "properties": {"kind": {"const": "event"}},
            "required": ["kind"],
            "additionalProperties": False,
        },
    ),
    ("integer_bounds", {"type": "integer", "minimum": -50, "maximum": 1234}),
    (
        "integer_exclusive_bounds",
        {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20},
    ),
    ("number_bounds", {"type": "number", "minimum": -1.5, "maximum": 2.25}),
    (
        "number_in_object",
        {
            "type": "object",
            "properties": {
                "lat": {"type": "number", "minimum": -90, "maximum": 90},
                "lon": {"type": "number", "minimum": -180, "maximum": 180},
            },
            "required": ["lat", "lon"],
            "additionalProperties": False,
        },
    ),
    ("string_pattern", {"type": "string", "pattern": "^[a-z]{2,5}_[0-9]{1,3}$"}),
    ("string_lengths", {"type": "string", "minLength": 3, "maxLength": 8}),
    (
        "string_formats",
        {
            "type": "object",
            "properties": {
                "day": {"type": "string", "format": "date"},
                "at": {"type": "string", "format": "time"},
                "id": {"type": "string", "format": "uuid"},
            },
            "required": ["day", "at", "id"],
            "additionalProperties": False,
        },
    ),
    (
        "any_of",
        {
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": 5},
                {"type": "string", "enum": ["none", "many"]},
                {
                    "type": "object",
                    "properties": {"n": {"type": "integer"}},
                    "required": ["n"],
                    "additionalProperties": False,
                },
            ],
        },
    ),
    (
        "one_of_disjoint",
        {
            "oneOf": [
                {
                    "type": "object",
                    "properties": {"cat": {"type": "string", "maxLength": 10}},
                    "required": ["cat"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {"dog": {"type": "boolean"}},
                    "required": ["dog"],
                    "additionalProperties": False,
                },
            ],
        },
    ),
    (
        "all_of",
        {
            "allOf": [
                {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]},
            ],
        },
    ),
    (
        "ref_defs",
        {
            "type": "object",
            "properties": {
                "home": {"$ref": "#/$defs/address"},
                "work": {"$ref": "#/$defs/address"},
            },
            "required": ["home"],
            "additionalProperties": False,
            "$defs": {"address": _ADDRESS},
        },
    ),
    (
        "recursive_ref",
        {
            "$ref": "#/$defs/node",
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {
                        "value": {"type": "integer"},
                        "children": {
                            "type": "array",
                            "items": {"$ref": "#/$defs/node"},
                            "maxItems": 2,
                        },
                    },
                    "required": ["value"],
                    "additionalProperties": False,
                }
            },
        },
    ),
    (
        "additional_properties_schema",
        {
            "type": "object",
            "additionalProperties": {"type": "integer"},
            "maxProperties": 3,
        },
    ),
    (
        "optional_properties",
        {
            "type": "object",
            "properties": {
                "a": {"type": "string", "maxLength": 5},
                "b": {"type": "integer"},
                "c": {"type": "boolean"},
            },
            "required": ["b"],
            "additionalProperties": False,
        },
    ),
    (
        "nullable_union",
        {
            "type": "object",
            "properties": {
                "note": {"type": ["string", "null"], "maxLength": 10},
                "score": {"type": ["number", "null"]},
            },
            "required": ["note", "score"],
            "additionalProperties": False,
        },
    ),
    (
        "tuple_prefix_items",
        {
            "type": "array",
            "prefixItems": [
                {"type": "string", "maxLength": 6},
                {"type": "integer"},
                {"type": "boolean"},
            ],
            "items": False,
            "minItems": 3,
        },
    ),
    (
        "tool_call_like",
        {
            "type": "object",
            "properties": {
                "name": {"const": "get_weather"},
                "arguments": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string", "maxLength": 20},
                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                        "days": {"type": "integer", "minimum": 1, "maximum": 7},
                    },
                    "required": ["city", "unit"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        },
    ),
    ("any_json_object", {"type": "object"}),
]

# One schema per JSON-schema feature, for the coverage table (benchmarks) and the
# "every feature in the table is enforced" checks.
COVERAGE_PROBES: dict[str, dict[str, Any]] = {
    "nested objects": SCHEMAS[1][1],
    "arrays minItems/maxItems": SCHEMAS[2][1],
    "enum": SCHEMAS[4][1],
    "integer minimum/maximum": SCHEMAS[7][1],
    "number minimum/maximum": SCHEMAS[9][1],
    "string pattern": SCHEMAS[11][1],
    "string minLength/maxLength": SCHEMAS[12][1],
    "format (date, time, uuid)": SCHEMAS[13][1],
    "anyOf": SCHEMAS[14][1],
    "oneOf": SCHEMAS[15][1],
    "allOf": SCHEMAS[16][1],
    "$ref/$defs": SCHEMAS[17][1],
    "recursive $ref": SCHEMAS[18][1],
    "additionalProperties false": SCHEMAS[1][1],
    "required": SCHEMAS[0][1],
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "not": {"not": {"type": "string"}},
    "if/then/else": {"if": {"type": "integer"}, "then": {"minimum": 0}, "else": {"type": "string"}},
    "contains": {"type": "array", "contains": {"type": "integer"}},
    "dependentRequired": {"type": "object", "dependentRequired": {"a": ["b"]}},
}


class WalkVocab:
    """Per-token facts the random walk uses to steer towards an end: decoded length, and
    whether the token is made only of closing characters (`"`, `]`, `}`)."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.size = len(texts)
        self.lengths = np.array([len(t) for t in texts])
        self.closing = np.array([bool(t) and set(t) <= set('"]}') for t in texts])


def random_walk(
    fill: Callable[[np.ndarray], None],
    accept: Callable[[int], bool],
    eos: Sequence[int],
    vocab: WalkVocab,
    rng: np.random.Generator,
    *,
    soft_cap: int = 40,
    hard_cap: int = 400,
) -> list[int]:
    """Generate under a grammar by picking, at each step, one token the mask allows: uniformly
    among all allowed tokens or (half the time) among the allowed one-character ones; an allowed
    EOS is taken half the time. Past `soft_cap` tokens it steers to an end: EOS as soon as it is
    allowed, else closing tokens, else the shortest allowed. Returns the tokens, the EOS last."""
    out = np.zeros((vocab.size + 31) // 32, dtype=np.int32)
    tokens: list[int] = []
    for step in range(hard_cap):
        out[:] = 0
        fill(out)
        bits = np.unpackbits(out.view(np.uint8), bitorder="little")[: vocab.size].astype(bool)
        allowed = np.flatnonzero(bits)
        assert len(allowed), f"empty mask after {tokens}"
        eos_ok = [e for e in eos if bits[e]]
        choices = allowed[~np.isin(allowed, eos)]
        if eos_ok and (step >= soft_cap or rng.random() < 0.5 or not len(choices)):
            assert accept(eos_ok[0]), "the mask allowed an EOS but the matcher refused it"
            tokens.append(eos_ok[0])
            return tokens
        if step >= soft_cap:
            closing = choices[vocab.closing[choices]]
            choices = (
                closing
                if len(closing)
                else choices[vocab.lengths[choices] == vocab.lengths[choices].min()]
            )
        elif rng.random() < 0.5 and (vocab.lengths[choices] == 1).any():
            choices = choices[vocab.lengths[choices] == 1]
        token = int(rng.choice(choices))
        assert accept(token), f"the mask allowed {token} but the matcher refused it"
        tokens.append(token)
    raise AssertionError(f"no end within {hard_cap} tokens: {tokens}")
