"""Switches read from the environment: one of a fixed set of words, `auto` when unset."""

from __future__ import annotations

import os


def env_choice(name: str, choices: tuple[str, ...]) -> str:
    """The value of `name` (stripped, lower-case; `auto` when unset or empty); ValueError
    naming the variable when it is not one of `choices`."""
    value = os.environ.get(name, "").strip().lower() or "auto"
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value
