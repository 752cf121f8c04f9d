"""Wire protocol: round trips, validation errors that name the field, hostile bytes."""

from __future__ import annotations

import dataclasses

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardline.transport.errors import TransportBroken
from shardline.transport.messages import (
    MESSAGE_TYPES,
    CachedRequest,
    ExecuteStep,
    Heartbeat,
    Hello,
    InitWorker,
    NewRequest,
    PromptLogprobs,
    SampleLogprobs,
    SamplingOptions,
    Shutdown,
    StepResult,
    TensorPayload,
    WorkerError,
    WorkerReady,
    decode,
    encode,
)

i64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
floats = st.floats(allow_nan=False)
texts = st.text(max_size=20)
ints = st.lists(i64, max_size=10)
sampling = st.builds(
    SamplingOptions,
    floats,
    i64,
    floats,
    floats,
    st.none() | i64,
    floats,
    floats,
    floats,
    st.none() | i64,
    ints,
    st.lists(floats, max_size=5),
    i64,
    ints,
    st.none() | i64,
)
new_request = st.builds(NewRequest, texts, ints, sampling, ints, i64, i64)
cached_request = st.builds(CachedRequest, texts, ints, ints, i64, i64, st.booleans())
logprobs = st.builds(SampleLogprobs, floats, ints, st.lists(floats, max_size=5), st.none() | i64)
prompt_logprobs = st.builds(PromptLogprobs, texts, i64, st.lists(logprobs, max_size=3))
msgpack_values = st.recursive(
    st.none() | st.booleans() | i64 | floats | texts | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=10,
)
messages = st.one_of(
    st.builds(Hello, i64, i64, i64),
    st.builds(InitWorker, st.dictionaries(texts, msgpack_values, max_size=5)),
    st.builds(WorkerReady, i64, i64),
    st.just(Shutdown()),
    st.builds(Heartbeat, i64, i64),
    st.builds(WorkerError, i64, texts, texts, texts),
    st.builds(
        ExecuteStep,
        i64,
        st.lists(new_request, max_size=3),
        st.lists(cached_request, max_size=3),
        st.lists(texts, max_size=3),
    ),
    st.builds(
        StepResult,
        i64,
        st.lists(texts, max_size=3),
        ints,
        st.none() | st.lists(st.none() | logprobs, max_size=3),
        st.lists(prompt_logprobs, max_size=2),
    ),
)


def test_every_message_type_is_covered_by_the_strategy() -> None:
    assert {cls.__name__ for cls in MESSAGE_TYPES} == {
        "Hello",
        "InitWorker",
        "WorkerReady",
        "Shutdown",
        "Heartbeat",
        "WorkerError",
        "ExecuteStep",
        "StepResult",
    }
    assert [cls.TAG for cls in MESSAGE_TYPES] == list(range(1, 9))  # type: ignore[attr-defined]


@given(messages)
def test_any_message_round_trips(msg: object) -> None:
    assert decode(encode(msg)) == msg  # type: ignore[arg-type]


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_transport_broken(data: bytes) -> None:
    try:
        msg = decode(data)
    except TransportBroken:
        return
    assert type(msg) in MESSAGE_TYPES


@settings(max_examples=300)
@given(st.integers(0, 10), st.lists(msgpack_values, max_size=6))
def test_well_formed_msgpack_with_wrong_shapes_raises_transport_broken(
    tag: int, fields: list[object]
) -> None:
    data = msgpack.packb([tag, *fields], use_bin_type=True)
    try:
        msg = decode(data)
    except TransportBroken:
        return
    assert type(msg) in MESSAGE_TYPES
    assert decode(encode(msg)) == msg


@given(messages, st.data())
def test_mutated_encodings_never_raise_anything_else(msg: object, data: st.DataObject) -> None:
    raw = bytearray(encode(msg))  # type: ignore[arg-type]
    if raw:
        index = data.draw(st.integers(0, len(raw) - 1))
        raw[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        decode(bytes(raw[:cut]))
    except TransportBroken:
        pass


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ([99], "unknown message tag 99"),
        (["x"], "unknown message tag 'x'"),
        ([1, 0, 1], "Hello: expected 3 fields"),
        ([1, 0, True, 3], "Hello.world_size: expected int, got bool"),
        ([5, 0, 1.5], "Heartbeat.seq: expected int, got float"),
        ([2, {1: 2}], "unhashable|InitWorker|undecodable"),
        (
            [
                7,
                1,
                [["r", [1, "2"], [1.0, -1, 1.0, 0.0, None, 0.0, 0.0, 1.0, None, [], [], 0, [], None], [], 0, 1]],
                [],
                [],
                [],
                None,
                [],
                [],
            ],
            r"ExecuteStep.new_requests\[0\].prompt_token_ids\[1\]: expected int, got str",
        ),
        (
            [7, 1, [["r", [1], [1.0, "k", 1.0, 0.0, None, 0.0, 0.0, 1.0, None, [], [], 0, [], None], [], 0, 1]], [], [], [], None, [], []],
            r"ExecuteStep.new_requests\[0\].sampling.top_k: expected int, got str",
        ),
        (
            [8, 1, ["a"], [2], [[0.5, [1], "x", None]], [], [], []],
            r"StepResult.logprobs\[0\].top_logprobs: expected list, got str",
        ),
    ],
)
def test_validation_errors_name_what_was_wrong(wire: list[object], expected: str) -> None:
    with pytest.raises(TransportBroken, match=expected):
        decode(msgpack.packb(wire, use_bin_type=True, strict_types=False))


def test_non_array_and_trailing_bytes_are_refused() -> None:
    with pytest.raises(TransportBroken, match="non-empty array"):
        decode(msgpack.packb({"tag": 1}))
    with pytest.raises(TransportBroken, match="undecodable"):
        decode(encode(Shutdown()) + b"\x00")


def test_float_fields_accept_integers_from_other_peers() -> None:
    wire = [8, 1, ["a"], [2], [[-1, [3], [0], 1]], [], [], []]
    msg = decode(msgpack.packb(wire))
    assert isinstance(msg, StepResult) and msg.logprobs is not None
    assert msg.logprobs[0] == SampleLogprobs(-1.0, [3], [0.0], 1)
    assert type(msg.logprobs[0].logprob) is float


def test_encode_refuses_records_and_unencodable_values() -> None:
    with pytest.raises(ValueError, match="top-level message"):
        encode(SampleLogprobs(0.0, [], []))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot encode InitWorker"):
        encode(InitWorker({"x": object()}))
    with pytest.raises(ValueError, match="cannot encode Heartbeat"):
        encode(Heartbeat(0, 2**70))


def test_tensor_payload_round_trips_numpy_and_torch() -> None:
    array = np.arange(12, dtype=">f4").reshape(3, 4)
    payload = TensorPayload.from_numpy(array)
    assert payload.dtype == "float32" and payload.shape == [3, 4]
    np.testing.assert_array_equal(payload.to_numpy(), array)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64):
        tensor = (torch.arange(6) - 3).to(dtype).reshape(2, 3)
        back = TensorPayload.from_torch(tensor).to_torch()
        assert back.dtype == dtype and torch.equal(back, tensor)
    empty = TensorPayload.from_torch(torch.empty(0, 4))
    assert empty.to_torch().shape == (0, 4)
    with pytest.raises(ValueError, match="not a torch dtype"):
        TensorPayload("nope", [1], b"\x00").to_torch()


def _naive_wire(value: object) -> object:
    """The wire form spelled out: a message or record is the array of its fields in order."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [_naive_wire(getattr(value, f.name)) for f in dataclasses.fields(value)]
        tag = getattr(type(value), "TAG", None)
        return fields if tag is None else [tag, *fields]
    if isinstance(value, list):
        return [_naive_wire(item) for item in value]
    if isinstance(value, dict):
        return {key: _naive_wire(item) for key, item in value.items()}
    return value


@given(messages)
def test_encoding_is_the_plain_field_arrays(msg: object) -> None:
    """The flattening shortcuts in `encode` do not change a byte on the wire."""
    assert encode(msg) == msgpack.packb(_naive_wire(msg), use_bin_type=True)  # type: ignore[arg-type]


def test_encode_refuses_a_message_nested_in_a_record_list() -> None:
    step = ExecuteStep(1, [], [CachedRequest("a", [], [], 0, 1, False), Heartbeat(0, 1)], [])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="Heartbeat cannot be nested"):
        encode(step)


def test_decoded_records_are_real_frozen_records() -> None:
    """Records built through their slots behave as ones built by their constructor."""
    step = ExecuteStep(3, [], [CachedRequest("a", [1], [2], 3, 1, True)], ["z"])
    decoded = decode(encode(step))
    assert isinstance(decoded, ExecuteStep)
    record = decoded.cached_requests[0]
    assert type(record) is CachedRequest and record == step.cached_requests[0]
    assert hash(record.req_id) == hash("a") and repr(record) == repr(step.cached_requests[0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.req_id = "b"  # type: ignore[misc]
