"""Architecture name -> how to build the model, for the built-in and users' own models.

A target is an `nn.Module` class or a factory `fn(model_config, parallel_context)` (both are
called the same way, inside the worker after its process groups exist, so they see the real
rank), or a lazy `"package.module:Class"` string imported only when first resolved.

Registrations made in the user's process reach spawned workers through `specs()` /
`register_specs()`: every registration as an importable `"module:qualname"` string.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, ClassVar

from shardline.model.errors import ModelInterfaceError, UnknownArchitectureError

Builder = Callable[..., Any]  # (model_config, parallel_context) -> nn.Module
REQUIRED_METHODS = ("forward", "compute_logits", "load_weights")


class ModelRegistry:
    """Class-level map from architecture names (`config.json` `architectures`) to builders."""

    _targets: ClassVar[dict[str, Builder | str]] = {
        "LlamaForCausalLM": "shardline.model.llama:LlamaForCausalLM",
        "MistralForCausalLM": "shardline.model.llama:MistralForCausalLM",
        "Qwen2ForCausalLM": "shardline.model.llama:Qwen2ForCausalLM",
        "Qwen3ForCausalLM": "shardline.model.qwen3:Qwen3ForCausalLM",
        "Phi3ForCausalLM": "shardline.model.phi3:Phi3ForCausalLM",
        "Gemma2ForCausalLM": "shardline.model.gemma2:Gemma2ForCausalLM",
        "Gemma3ForCausalLM": "shardline.model.gemma3:Gemma3ForCausalLM",
        "MixtralForCausalLM": "shardline.model.mixtral:MixtralForCausalLM",
        "Qwen2MoeForCausalLM": "shardline.model.qwen2_moe:Qwen2MoeForCausalLM",
        "Qwen3MoeForCausalLM": "shardline.model.qwen3_moe:Qwen3MoeForCausalLM",
    }

    @classmethod
    def register_model(cls, arch_name: str, target: Builder | str) -> None:
        """Register (or replace) the builder for `arch_name`."""
        if not isinstance(arch_name, str) or not arch_name:
            raise ValueError(f"architecture name must be a non-empty string, got {arch_name!r}")
        if isinstance(target, str):
            module, sep, attr = target.partition(":")
            if not sep or not module or not attr:
                raise ValueError(f"lazy target must look like 'package.module:Class', got {target!r}")
        elif not callable(target):
            raise TypeError(
                f"target for {arch_name!r} must be a class, a factory callable or a "
                f"'module:Class' string, got {type(target).__name__}"
            )
        cls._targets[arch_name] = target

    @classmethod
    def unregister(cls, arch_name: str) -> None:
        cls._targets.pop(arch_name, None)

    @classmethod
    def known(cls) -> list[str]:
        return sorted(cls._targets)

    @classmethod
    def resolve(cls, arch_name: str) -> Builder:
        """The builder for `arch_name`, importing a lazy target now."""
        try:
            target = cls._targets[arch_name]
        except KeyError:
            raise UnknownArchitectureError(
                f"unknown model architecture {arch_name!r}; known: {', '.join(cls.known())} "
                "(register your own with ModelRegistry.register_model)"
            ) from None
        if isinstance(target, str):
            target = _import_target(arch_name, target)
            cls._targets[arch_name] = target
        return target

    @classmethod
    def specs(cls) -> dict[str, str]:
        """Every registration as an importable `"module:qualname"` (for spawned workers)."""
        out = {}
        for arch, target in cls._targets.items():
            if isinstance(target, str):
                out[arch] = target
                continue
            module = getattr(target, "__module__", None)
            qualname = getattr(target, "__qualname__", "")
            if not module or "<" in qualname or module == "__main__":
                raise ValueError(
                    f"the target registered for {arch!r} ({target!r}) cannot be imported by a "
                    "worker process; register a module-level class or function, or a "
                    "'module:Class' string"
                )
            out[arch] = f"{module}:{qualname}"
        return out

    @classmethod
    def register_specs(cls, specs: dict[str, str]) -> None:
        """Apply `specs()` from another process (lazily: nothing is imported yet)."""
        for arch, spec in specs.items():
            if cls._targets.get(arch) is not None and _spec_of(cls._targets[arch]) == spec:
                continue
            cls.register_model(arch, spec)


def _spec_of(target: Builder | str) -> str | None:
    if isinstance(target, str):
        return target
    return f"{getattr(target, '__module__', '')}:{getattr(target, '__qualname__', '')}"


def _import_target(arch_name: str, spec: str) -> Builder:
    module_name, _, attr_path = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr_path.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise UnknownArchitectureError(
            f"cannot import {spec!r} registered for {arch_name!r}: {exc}"
        ) from exc
    if not callable(obj):
        raise ModelInterfaceError(f"{spec!r} registered for {arch_name!r} is not callable")
    return obj


def check_model_interface(model: Any, arch_name: str) -> None:
    """Raise ModelInterfaceError naming every method of the model interface `model` lacks."""
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(model, m, None))]
    if missing:
        raise ModelInterfaceError(
            f"model built for {arch_name!r} ({type(model).__name__}) is missing "
            f"{', '.join(missing)}; a model must define forward(input_ids, positions, attn), "
            "compute_logits(hidden) and load_weights(weights)"
        )
