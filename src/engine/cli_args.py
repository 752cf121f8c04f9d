"""EngineConfig's fields as command-line flags, derived from the dataclass itself.

Every field of `EngineConfig` becomes `--field-name` (its type, its default, its docstring as
help), so a field added there is on the command line with nothing else to write;
tests/server/test_cli_vllm.py fails for a field that has neither a flag nor an entry in
`EXCLUDED_FIELDS`. `FLAG_EXTRAS` adds what the dataclass cannot say: vLLM's short and
negative spellings (-tp, --enforce-eager, --no-prefix-caching), byte sizes, metavars.
Options left out of a command line stay out of the namespace (argparse.SUPPRESS), so the
dataclass's own defaults apply: there is no second copy of them here.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from shardline.engine.config import DEVICE_CHOICES, DTYPES, KV_CACHE_DTYPES, EngineConfig

TCP_TOKEN_ENV = "SHARDLINE_TOKEN"  # the node agents' variable; the head reads it too

EXCLUDED_FIELDS: Mapping[str, str] = types.MappingProxyType({})
"""Fields without a flag, each with the reason (objects a command line cannot write)."""


_BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def byte_size(text: str) -> int:
    """`512M`, `2G`, `1.5G` or a plain byte count (binary units, an optional trailing B/iB)."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _BYTE_UNITS else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 512M, 2G)") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return int(number * _BYTE_UNITS[unit])


@dataclass(frozen=True)
class FlagExtra:
    """What a field's flag needs beyond its name, type, default and docstring."""

    aliases: tuple[str, ...] = ()
    """More spellings of the same flag (vLLM's -tp)."""
    negations: tuple[str, ...] = ()
    """For a bool field: flags that set it False (vLLM's --enforce-eager for cuda_graphs)."""
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    help: str | None = None
    """Appended to the field's docstring."""


FLAG_EXTRAS: Mapping[str, FlagExtra] = types.MappingProxyType({
    "model": FlagExtra(metavar="MODEL"),
    "served_model_name": FlagExtra(metavar="NAME"),
    "generation_config": FlagExtra(metavar="auto|vllm|PATH"),
    "chat_template": FlagExtra(metavar="PATH_OR_TEMPLATE"),
    "tensor_parallel_size": FlagExtra(aliases=("-tp",), metavar="N"),
    "pipeline_parallel_size": FlagExtra(aliases=("-pp",), metavar="N"),
    "data_parallel_size": FlagExtra(aliases=("-dp",), metavar="N"),
    "device": FlagExtra(metavar="{" + ",".join(DEVICE_CHOICES) + "}"),
    "dtype": FlagExtra(choices=tuple(DTYPES)),
    "kv_cache_memory_bytes": FlagExtra(type=byte_size, metavar="BYTES", help="e.g. 2G or 512M."),
    "kv_cache_dtype": FlagExtra(metavar="{" + ",".join(KV_CACHE_DTYPES) + "}"),
    "enable_prefix_caching": FlagExtra(negations=("--no-prefix-caching",)),
    "cuda_graphs": FlagExtra(negations=("--enforce-eager",)),
    "tcp_token": FlagExtra(help=f"Prefer ${TCP_TOKEN_ENV}: a command line is visible to every user of the "
                                "machine through `ps`."),
    "plugins": FlagExtra(metavar="MODULE:FUNCTION"),
})  # fmt: skip


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


@functools.cache
def field_docs() -> dict[str, str]:
    """Each EngineConfig field's docstring (the string literal under it), whitespace folded."""
    tree = ast.parse(inspect.getsource(EngineConfig))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = re.sub(r"\s+", " ", following.value.value).strip()
    return docs


@dataclass(frozen=True)
class _Shape:
    """How a field's annotation reads on the command line."""

    kind: Literal["bool", "scalar", "list"]
    type: Callable[[str], Any]
    choices: tuple[Any, ...] | None = None


def _shape(annotation: Any) -> _Shape:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        tuples = [a for a in args if typing.get_origin(a) is tuple]
        if tuples:  # `str | tuple[str, ...]`: a list on the command line
            return _shape(tuples[0])
        return _shape(args[0])
    if origin is tuple:
        return _Shape("list", args[0])
    if origin is Literal:
        return _Shape("scalar", type(args[0]), tuple(args))
    if annotation is bool:
        return _Shape("bool", bool)
    if annotation in (int, float, str):
        return _Shape("scalar", annotation)
    raise TypeError(
        f"no command-line form for {annotation!r}; add the field to EXCLUDED_FIELDS with a reason"
    )


def _default_text(field: dataclasses.Field[Any]) -> str:
    if (
        field.default is dataclasses.MISSING
        or field.default is None
        or isinstance(field.default, bool)
    ):
        return ""
    return f" (default: {field.default})"


_METAVARS: Mapping[Any, str] = types.MappingProxyType({int: "N", float: "F"})


def add_engine_args(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per EngineConfig field (but those in `skip`, which the command adds itself)."""
    group = parser.add_argument_group("engine (EngineConfig)")
    hints = typing.get_type_hints(EngineConfig)
    docs = field_docs()
    for field in dataclasses.fields(EngineConfig):
        name = field.name
        if name in EXCLUDED_FIELDS or name in skip:
            continue
        extra = FLAG_EXTRAS.get(name, FlagExtra())
        shape = _shape(hints[name])
        text = " ".join(t for t in (docs.get(name, ""), extra.help) if t) + _default_text(field)
        kwargs: dict[str, Any] = {
            "dest": name,
            "default": argparse.SUPPRESS,
            "help": text.replace("%", "%%"),
        }
        if shape.kind == "bool":
            group.add_argument(
                flag_name(name), *extra.aliases, action=argparse.BooleanOptionalAction, **kwargs
            )
            for negation in extra.negations:
                group.add_argument(
                    negation,
                    dest=name,
                    action="store_false",
                    default=argparse.SUPPRESS,
                    help=f"the same as --no-{name.replace('_', '-')}",
                )
            continue
        kwargs["type"] = extra.type or shape.type
        choices = extra.choices or shape.choices
        if choices:
            kwargs["choices"] = choices
        metavar = extra.metavar or _METAVARS.get(kwargs["type"]) if not choices else extra.metavar
        if metavar:
            kwargs["metavar"] = metavar
        if shape.kind == "list":
            kwargs["nargs"] = "+"
        group.add_argument(flag_name(name), *extra.aliases, **kwargs)


def flag_fields() -> list[str]:
    """The EngineConfig fields that have a flag."""
    return [f.name for f in dataclasses.fields(EngineConfig) if f.name not in EXCLUDED_FIELDS]


def engine_config_from_args(args: argparse.Namespace, **defaults: Any) -> EngineConfig:
    """The EngineConfig a parsed command line asks for: the fields it set (lists as tuples),
    then `defaults` (the command's own, e.g. generate's one sequence), then the dataclass's."""
    given = {name: getattr(args, name) for name in flag_fields() if hasattr(args, name)}
    given = {
        name: tuple(value) if isinstance(value, list) else value for name, value in given.items()
    }
    if "tcp_token" not in given and os.environ.get(TCP_TOKEN_ENV):
        given["tcp_token"] = os.environ[TCP_TOKEN_ENV]
    return EngineConfig(**{**defaults, **given})
