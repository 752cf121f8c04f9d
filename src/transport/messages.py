"""Every message the engine and its workers exchange, and their msgpack wire form.

Top-level messages are frozen, slotted dataclasses with a one-byte ``TAG``; they encode as a
msgpack array ``[tag, field1, field2, ...]``. Nested records (no tag) encode as plain arrays in
field order. Tensors travel as :class:`TensorPayload` (raw little-endian bytes + dtype + shape).

:func:`decode` is the only way bytes become objects: it checks the tag, the arity and every
field's type recursively against the dataclass annotations, and raises
:class:`~transport.errors.TransportBroken` naming what was wrong -- never any other exception,
for any input. Nothing here is pickled.
"""

from __future__ import annotations

import dataclasses
import operator
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import msgpack

from shardline.transport.errors import TransportBroken

if typing.TYPE_CHECKING:
    import numpy as np
    import torch

# ---------------------------------------------------------------------------------------------
# Nested records


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """Per-request sampling settings as the workers see them.

    ``top_k = -1`` means off; ``temperature == 0`` means greedy; ``num_logprobs`` None means no
    logprobs, ``k >= 0`` means the sampled token's logprob plus the top k.
    ``logit_bias_ids[i]`` gets ``logit_bias_values[i]`` added to its logit. While fewer than
    ``min_tokens`` tokens were sampled after the request's token list as sent in its
    NewRequest, ``min_tokens_stop_ids`` cannot be sampled. ``prompt_logprobs`` k: the step
    results carry each prompt token's logprob plus the top k (``PromptLogprobs``).
    """

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int | None
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    num_logprobs: int | None
    logit_bias_ids: list[int] = dataclasses.field(default_factory=list)
    logit_bias_values: list[float] = dataclasses.field(default_factory=list)
    min_tokens: int = 0
    min_tokens_stop_ids: list[int] = dataclasses.field(default_factory=list)
    prompt_logprobs: int | None = None


@dataclass(frozen=True, slots=True)
class NewRequest:
    """A request scheduled for the first time (or re-sent in full): everything a worker keeps."""

    req_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions
    block_ids: list[int]
    num_computed_tokens: int
    num_scheduled_tokens: int


@dataclass(frozen=True, slots=True)
class CachedRequest:
    """The diff for a request the workers already know (see docs/INTERFACES.md section 1)."""

    req_id: str
    new_token_ids: list[int]
    new_block_ids: list[int]
    num_computed_tokens: int
    num_scheduled_tokens: int
    resumed: bool


@dataclass(frozen=True, slots=True)
class SampleLogprobs:
    """The sampled token's logprob and the top-k alternatives; ``rank`` is the token's 1-based
    rank in the distribution (how many tokens have a logprob >= its own, as vLLM counts)."""

    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]
    rank: int | None = None


@dataclass(frozen=True, slots=True)
class PromptLogprobs:
    """Logprobs of prompt tokens ``first_position, first_position + 1, ...`` of one request,
    each given the tokens before it (a prefill chunk's positions score the next token)."""

    req_id: str
    first_position: int
    entries: list[SampleLogprobs]


@dataclass(frozen=True, slots=True)
class TensorPayload:
    """A tensor as raw little-endian bytes plus its dtype name and shape."""

    dtype: str
    shape: list[int]
    data: bytes

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorPayload:
        """Copy a numpy array into a payload (converted to little-endian, C order)."""
        import numpy as np

        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        contiguous = np.ascontiguousarray(array, dtype=dtype)
        return cls(dtype=dtype.name, shape=list(contiguous.shape), data=contiguous.tobytes())

    def to_numpy(self) -> np.ndarray:
        """A read-only numpy view of the payload bytes (no copy)."""
        import numpy as np

        try:
            dtype = np.dtype(self.dtype).newbyteorder("<")
        except TypeError as exc:
            raise ValueError(f"TensorPayload dtype {self.dtype!r} is not a numpy dtype") from exc
        return np.frombuffer(self.data, dtype=dtype).reshape(self.shape)

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> TensorPayload:
        """Copy a torch tensor (any device) into a payload; bfloat16 travels as its raw bits."""
        import torch

        cpu = tensor.detach().to("cpu").contiguous()
        name = str(cpu.dtype).removeprefix("torch.")
        if cpu.dtype == torch.bfloat16:
            cpu = cpu.view(torch.int16)
        payload = cls.from_numpy(cpu.numpy())
        return cls(dtype=name, shape=list(tensor.shape), data=payload.data)

    def to_torch(self) -> torch.Tensor:
        """A new CPU torch tensor holding a copy of the payload."""
        import torch

        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"TensorPayload dtype {self.dtype!r} is not a torch dtype")
        if not self.data:
            return torch.empty(self.shape, dtype=dtype)
        return torch.frombuffer(bytearray(self.data), dtype=dtype).reshape(self.shape)


# ---------------------------------------------------------------------------------------------
# Top-level messages


@dataclass(frozen=True, slots=True)
class Hello:
    """First message a worker sends: who it is."""

    TAG: ClassVar[int] = 1
    rank: int
    world_size: int
    pid: int


@dataclass(frozen=True, slots=True)
class InitWorker:
    """Engine -> worker configuration; values are msgpack-native (no custom objects)."""

    TAG: ClassVar[int] = 2
    config: dict[str, Any]


@dataclass(frozen=True, slots=True)
class WorkerReady:
    """Worker -> engine: the model is loaded and this many KV blocks fit."""

    TAG: ClassVar[int] = 3
    rank: int
    num_kv_blocks: int


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Engine -> workers: finish and exit."""

    TAG: ClassVar[int] = 4


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Worker -> engine liveness beacon."""

    TAG: ClassVar[int] = 5
    rank: int
    seq: int


@dataclass(frozen=True, slots=True)
class WorkerError:
    """Worker -> engine: something failed; ``kind`` is the exception class name."""

    TAG: ClassVar[int] = 6
    rank: int
    kind: str
    message: str
    traceback: str


@dataclass(frozen=True, slots=True)
class ExecuteStep:
    """Engine -> workers: run one step (diffs only; see docs/INTERFACES.md section 1).

    ``bitmask_req_ids`` are the constrained requests (structured output) that sample in this
    step; row i of ``bitmask`` (int32 [len(bitmask_req_ids), ceil(vocab / 32)]) is the token mask
    of ``bitmask_req_ids[i]``: bit j of word w set = token 32 * w + j may be sampled.

    Speculative decoding: ``spec_token_ids[i]`` are the k draft tokens of ``spec_req_ids[i]``;
    that request's chunk is its last token then these drafts (1 + k tokens, the drafts not in
    its token list), and its step verifies them (worker/speculative.py)."""

    TAG: ClassVar[int] = 7
    step_id: int
    new_requests: list[NewRequest]
    cached_requests: list[CachedRequest]
    finished_ids: list[str]
    bitmask_req_ids: list[str] = dataclasses.field(default_factory=list)
    bitmask: TensorPayload | None = None
    spec_req_ids: list[str] = dataclasses.field(default_factory=list)
    spec_token_ids: list[list[int]] = dataclasses.field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StepResult:
    """Output rank -> engine: the tokens sampled in a step, in the step's request order.

    Speculative decoding (a step with ``spec_req_ids``): ``spec_num_accepted[i]`` is how many
    draft tokens of ``req_ids[i]`` were accepted (0 for a request without drafts) and
    ``sampled_token_ids[i]`` the token after them (the correction or the bonus token);
    ``spec_logprobs[i]`` the logprobs entries of the accepted drafts (when asked for)."""

    TAG: ClassVar[int] = 8
    step_id: int
    req_ids: list[str]
    sampled_token_ids: list[int]
    logprobs: list[SampleLogprobs | None] | None
    prompt_logprobs: list[PromptLogprobs] = dataclasses.field(default_factory=list)
    spec_num_accepted: list[int] = dataclasses.field(default_factory=list)
    spec_logprobs: list[list[SampleLogprobs]] = dataclasses.field(default_factory=list)


Message = Union[
    Hello, InitWorker, WorkerReady, Shutdown, Heartbeat, WorkerError, ExecuteStep, StepResult
]
MESSAGE_TYPES: tuple[type, ...] = typing.get_args(Message)
RECORD_TYPES: tuple[type, ...] = (
    SamplingOptions,
    NewRequest,
    CachedRequest,
    SampleLogprobs,
    PromptLogprobs,
    TensorPayload,
)
MESSAGES_BY_TAG: dict[int, type] = {cls.TAG: cls for cls in MESSAGE_TYPES}  # type: ignore[attr-defined]

# ---------------------------------------------------------------------------------------------
# Encoding: msgpack walks lists/dicts itself and calls `_record_to_list` for our records.

_FIELD_NAMES: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in MESSAGE_TYPES + RECORD_TYPES
}


def _fields_getter(cls: type) -> Callable[[Any], tuple[Any, ...]]:
    """A C-level `obj -> (field1, field2, ...)` for one dataclass (msgpack packs tuples as arrays)."""
    names = _FIELD_NAMES[cls]
    if len(names) == 1:
        name = names[0]
        return lambda obj: (getattr(obj, name),)
    if not names:
        return lambda obj: ()
    return operator.attrgetter(*names)  # type: ignore[return-value]


_RECORD_FIELDS: dict[type, Callable[[Any], tuple[Any, ...]]] = {cls: _fields_getter(cls) for cls in RECORD_TYPES}
_MESSAGE_FIELDS: dict[type, Callable[[Any], tuple[Any, ...]]] = {cls: _fields_getter(cls) for cls in MESSAGE_TYPES}


def _record_lists(cls: type) -> tuple[tuple[int, frozenset[type], Callable[[Any], tuple[Any, ...]]], ...]:
    """(position in the wire array, {record type}, its getter) for each `list[Record]` field."""
    hints = typing.get_type_hints(cls)
    found = []
    for index, name in enumerate(_FIELD_NAMES[cls]):
        tp = hints[name]
        if typing.get_origin(tp) is list and typing.get_args(tp)[0] in _RECORD_FIELDS:
            record = typing.get_args(tp)[0]
            found.append((index + 1, frozenset((record,)), _RECORD_FIELDS[record]))
    return tuple(found)


_RECORD_LISTS = {cls: _record_lists(cls) for cls in MESSAGE_TYPES}


def _record_to_list(obj: Any) -> tuple[Any, ...]:
    getter = _RECORD_FIELDS.get(type(obj))
    if getter is None:
        raise TypeError(f"{type(obj).__name__} cannot be nested in a message")
    return getter(obj)


def encode(msg: Message) -> bytes:
    """The msgpack bytes of a top-level message. Raises ValueError for an unencodable value.

    Lists of records (an ExecuteStep's hundreds of CachedRequests) are flattened up front
    with C-level attribute getters, after a C-level check that every item is that record;
    anything else (nested records, odd values) goes through msgpack's `default` hook.
    """
    cls = type(msg)
    getter = _MESSAGE_FIELDS.get(cls)
    if getter is None:
        raise ValueError(f"encode() takes a top-level message, not {cls.__name__}")
    fields = [cls.TAG, *getter(msg)]  # type: ignore[attr-defined]
    for index, only, record_fields in _RECORD_LISTS[cls]:
        value = fields[index]
        if type(value) is list and only.issuperset(map(type, value)):
            fields[index] = list(map(record_fields, value))
    try:
        return msgpack.packb(fields, default=_record_to_list, use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"cannot encode {cls.__name__}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Decoding: one validator per annotated type, compiled once at import.

Validator = Callable[[Any, str], Any]


def _type_name(value: Any) -> str:
    return type(value).__name__


def _exact(expected: type) -> Validator:
    def check(value: Any, where: str) -> Any:
        if type(value) is expected:
            return value
        raise TransportBroken(f"{where}: expected {expected.__name__}, got {_type_name(value)}")

    return check


def _float(value: Any, where: str) -> Any:
    if type(value) is float:
        return value
    if type(value) is int:  # msgpack packs 1.0-valued floats as floats, but peers may send ints
        return float(value)
    raise TransportBroken(f"{where}: expected float, got {_type_name(value)}")


def _list_of(item_type: Any) -> Validator:
    if item_type in (int, str, bool, bytes):  # fast path: a scan, no per-item call or copy
        item_check = _exact(item_type)
        only = frozenset((item_type,))

        def check_plain(value: Any, where: str) -> Any:
            if type(value) is not list:
                raise TransportBroken(f"{where}: expected list, got {_type_name(value)}")
            if only.issuperset(map(type, value)):  # the scan runs in C
                return value
            for index, item in enumerate(value):
                item_check(item, f"{where}[{index}]")
            return value  # pragma: no cover - the scan above found a bad item

        return check_plain
    item_validator = _compile(item_type)
    fast_item = _FAST_RECORDS.get(item_type)

    def check(value: Any, where: str) -> Any:
        if type(value) is not list:
            raise TransportBroken(f"{where}: expected list, got {_type_name(value)}")
        try:
            # Fast path: no per-item label (a step carries hundreds of records); records
            # are built by their generated builder, called straight from C.
            if fast_item is not None:
                return list(map(fast_item, value))
            return [item_validator(item, where) for item in value]
        except (_Slow, TransportBroken):
            # Validation is pure: run again with precise labels for the error message.
            return [item_validator(item, f"{where}[{index}]") for index, item in enumerate(value)]

    return check


def _optional(inner_type: Any) -> Validator:
    inner = _compile(inner_type)

    def check(value: Any, where: str) -> Any:
        return None if value is None else inner(value, where)

    return check


def _str_keyed_dict(value: Any, where: str) -> Any:
    if type(value) is not dict:
        raise TransportBroken(f"{where}: expected dict, got {_type_name(value)}")
    for key in value:
        if type(key) is not str:
            raise TransportBroken(f"{where}: expected str keys, got a {_type_name(key)} key")
    return value


_PLAIN = {int: "int", str: "str", bool: "bool", bytes: "bytes"}


def _fast_test(tp: Any, var: str) -> str | None:
    """A Python expression that is True when `var` is valid as `tp` and needs no conversion,
    for the plain field types; None for the others (they go through their validator)."""
    if tp in _PLAIN:
        return f"type({var}) is {_PLAIN[tp]}"
    if tp is float:
        return f"type({var}) is float"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list and args[0] in _PLAIN:
        return f"(type({var}) is list and _ONLY_{_PLAIN[args[0]]}.issuperset(map(type, {var})))"
    if origin in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = _fast_test(next(a for a in args if a is not type(None)), var)
        return None if inner is None else f"({var} is None or {inner})"
    return None


class _Slow(Exception):
    """A generated record builder met something it does not take; the general path decides."""


# Builders by record type, filled in as `_record` compiles each (nested records come first).
_FAST_RECORDS: dict[type, Callable[[Any], Any]] = {}


def _fast_record(cls: type, hints: dict[str, Any], validators: list[Validator]) -> Callable[[Any], Any]:
    """A generated builder for one record from its wire array: inline type tests for plain
    fields, the compiled validator for the others. It raises _Slow (or the validator's
    TransportBroken) when anything is off; the caller then runs the general path, which
    names the problem. The record is built through its slots (what a frozen dataclass's
    `__init__` does with one `object.__setattr__` per field, at half the cost)."""
    names = _FIELD_NAMES[cls]
    values, tests = [], []
    for index, name in enumerate(names):
        var = f"f{index}"
        test = _fast_test(hints[name], var)
        if test is None:
            values.append(f"_v{index}({var}, '')")
        else:
            values.append(var)
            tests.append(test)
    body = ["def fast(value):", f"    if type(value) is not list or len(value) != {len(names)}:", "        raise _Slow"]
    if names:
        body.append("    " + ", ".join(f"f{i}" for i in range(len(names))) + ", = value")
    if tests:
        body.append(f"    if not ({' and '.join(tests)}):")
        body.append("        raise _Slow")
    slots = [vars(cls).get(name) for name in names]
    by_slots = getattr(cls, "__post_init__", None) is None and all(
        type(slot) is types.MemberDescriptorType for slot in slots
    )
    if by_slots:
        body.append("    record = _new(_cls)")
        body.extend(f"    _set{i}(record, {value})" for i, value in enumerate(values))
        body.append("    return record")
    else:
        body.append(f"    return _cls({', '.join(values)})")
    namespace: dict[str, Any] = {"_cls": cls, "_new": object.__new__, "_Slow": _Slow}
    namespace.update({f"_v{i}": v for i, v in enumerate(validators)})
    namespace.update({f"_ONLY_{n}": frozenset((t,)) for t, n in _PLAIN.items()})
    if by_slots:
        namespace.update({f"_set{i}": slot.__set__ for i, slot in enumerate(slots)})  # type: ignore[union-attr]
    exec("\n".join(body), namespace)  # noqa: S102 - generated from our own annotations only
    return namespace["fast"]  # type: ignore[no-any-return]


def _record(cls: type) -> Validator:
    hints = typing.get_type_hints(cls)
    names = _FIELD_NAMES[cls]
    validators = [_compile(hints[name]) for name in names]
    labels = [f".{name}" for name in names]
    fast = _FAST_RECORDS[cls] = _fast_record(cls, hints, validators)

    def check(value: Any, where: str) -> Any:
        try:
            return fast(value)  # labels are only built for an error message, below
        except (_Slow, TransportBroken):
            pass
        if type(value) is not list:
            raise TransportBroken(
                f"{where}: expected a {cls.__name__} array, got {_type_name(value)}"
            )
        if len(value) != len(validators):
            raise TransportBroken(
                f"{where}: expected {len(validators)} fields of {cls.__name__}, got {len(value)}"
            )
        return cls(
            *[
                v(item, where + label)
                for v, item, label in zip(validators, value, labels, strict=True)
            ]
        )

    return check


def _compile(tp: Any) -> Validator:
    if tp is float:
        return _float
    if tp in (int, str, bool, bytes):
        return _exact(tp)
    if tp in _FIELD_NAMES:
        return _record(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return _list_of(args[0])
    if origin is dict and args[0] is str:
        return _str_keyed_dict
    if origin in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return _optional(next(a for a in args if a is not type(None)))
    raise TypeError(f"no wire validator for annotation {tp!r}")  # a bug in this module


def _message_decoder(cls: type) -> Callable[[list[Any]], Any]:
    fields = _record(cls)
    name = cls.__name__

    def decode_fields(array: list[Any]) -> Any:
        return fields(array[1:], name)

    return decode_fields


_DECODERS: dict[int, Callable[[list[Any]], Any]] = {
    tag: _message_decoder(cls) for tag, cls in MESSAGES_BY_TAG.items()
}


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Turn wire bytes into a message, validating everything; raises TransportBroken only."""
    try:
        array = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types (ExtraData, FormatError, ValueError, ...)
        raise TransportBroken(f"undecodable message bytes ({type(exc).__name__}: {exc})") from exc
    if type(array) is not list or not array:
        raise TransportBroken(f"a message must be a non-empty array, got {_type_name(array)}")
    tag = array[0]
    decoder = _DECODERS.get(tag) if type(tag) is int else None
    if decoder is None:
        raise TransportBroken(f"unknown message tag {tag!r}")
    try:
        return decoder(array)  # type: ignore[no-any-return]
    except TransportBroken:
        raise
    except Exception as exc:  # e.g. a hash() of odd data; should not happen, never leaks
        raise TransportBroken(f"invalid {MESSAGES_BY_TAG[tag].__name__}: {exc}") from exc
