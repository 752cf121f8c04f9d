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
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import msgpack

from transport.errors import TransportBroken

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
    """The sampled token's logprob and the top-k alternatives."""

    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


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
    """Engine -> workers: run one step (diffs only; see docs/INTERFACES.md section 1)."""

    TAG: ClassVar[int] = 7
    step_id: int
    new_requests: list[NewRequest]
    cached_requests: list[CachedRequest]
    finished_ids: list[str]


@dataclass(frozen=True, slots=True)
class StepResult:
    """Output rank -> engine: the tokens sampled in a step, in the step's request order."""

    TAG: ClassVar[int] = 8
    step_id: int
    req_ids: list[str]
    sampled_token_ids: list[int]
    logprobs: list[SampleLogprobs | None] | None


Message = Union[
    Hello, InitWorker, WorkerReady, Shutdown, Heartbeat, WorkerError, ExecuteStep, StepResult
]
MESSAGE_TYPES: tuple[type, ...] = typing.get_args(Message)
RECORD_TYPES: tuple[type, ...] = (
    SamplingOptions,
    NewRequest,
    CachedRequest,
    SampleLogprobs,
    TensorPayload,
)
MESSAGES_BY_TAG: dict[int, type] = {cls.TAG: cls for cls in MESSAGE_TYPES}  # type: ignore[attr-defined]

# ---------------------------------------------------------------------------------------------
# Encoding: msgpack walks lists/dicts itself and calls `_record_to_list` for our records.

_FIELD_NAMES: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in MESSAGE_TYPES + RECORD_TYPES
}


def _record_to_list(obj: Any) -> list[Any]:
    names = _FIELD_NAMES.get(type(obj))
    if names is None or type(obj) in MESSAGES_BY_TAG.values():
        raise TypeError(f"{type(obj).__name__} cannot be nested in a message")
    return [getattr(obj, name) for name in names]


def encode(msg: Message) -> bytes:
    """The msgpack bytes of a top-level message. Raises ValueError for an unencodable value."""
    cls = type(msg)
    if cls not in MESSAGES_BY_TAG.values():
        raise ValueError(f"encode() takes a top-level message, not {cls.__name__}")
    fields = [getattr(msg, name) for name in _FIELD_NAMES[cls]]
    try:
        return msgpack.packb([cls.TAG, *fields], default=_record_to_list, use_bin_type=True)  # type: ignore[attr-defined]
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

    def check(value: Any, where: str) -> Any:
        if type(value) is not list:
            raise TransportBroken(f"{where}: expected list, got {_type_name(value)}")
        try:
            # Fast path: no per-item label (a step carries hundreds of records).
            return [item_validator(item, where) for item in value]
        except TransportBroken:
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


def _fast_record(cls: type, hints: dict[str, Any], validators: list[Validator]) -> Callable[[list[Any], str], Any]:
    """A generated checker for one record: inline type tests for plain fields, the compiled
    validator for the others; it returns None when a plain test fails (the caller then runs
    the general path, which names the problem)."""
    names = _FIELD_NAMES[cls]
    args, tests = [], []
    for index, name in enumerate(names):
        var = f"f{index}"
        test = _fast_test(hints[name], var)
        if test is None:
            args.append(f"_v{index}({var}, where)")
        else:
            args.append(var)
            tests.append(test)
    unpack = ", ".join(f"f{i}" for i in range(len(names))) + ("," if len(names) == 1 else "")
    body = ["def fast(value, where):", f"    {unpack} = value"] if names else ["def fast(value, where):"]
    if tests:
        body.append(f"    if not ({' and '.join(tests)}):")
        body.append("        return None")
    body.append(f"    return _cls({', '.join(args)})")
    namespace: dict[str, Any] = {"_cls": cls}
    namespace.update({f"_v{i}": v for i, v in enumerate(validators)})
    namespace.update({f"_ONLY_{n}": frozenset((t,)) for t, n in _PLAIN.items()})
    exec("\n".join(body), namespace)  # noqa: S102 - generated from our own annotations only
    return namespace["fast"]  # type: ignore[no-any-return]


def _record(cls: type) -> Validator:
    hints = typing.get_type_hints(cls)
    names = _FIELD_NAMES[cls]
    validators = [_compile(hints[name]) for name in names]
    labels = [f".{name}" for name in names]
    fast = _fast_record(cls, hints, validators)

    def check(value: Any, where: str) -> Any:
        if type(value) is not list:
            raise TransportBroken(
                f"{where}: expected a {cls.__name__} array, got {_type_name(value)}"
            )
        if len(value) != len(validators):
            raise TransportBroken(
                f"{where}: expected {len(validators)} fields of {cls.__name__}, got {len(value)}"
            )
        try:
            # Fast path: labels are only built for an error message.
            record = fast(value, where)
            if record is not None:
                return record
        except TransportBroken:
            pass
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
