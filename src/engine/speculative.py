"""Speculative decoding, engine side: the configuration and the n-gram (prompt lookup) proposer.

`EngineConfig.speculative_config` (vLLM's ``--speculative-config``, a JSON object) turns it on:

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    {"model": "path/to/small-model", "num_speculative_tokens": 4}   (method "draft_model")

A draft model (engine/draft_model.py) proposes the k tokens instead of the n-gram lookup: its
greedy continuation of the request's context, computed by a second engine; everything after the
proposal (verification, roll-back, metrics) is the same as below.

Each decode step, the scheduler asks `propose_ngram` for up to k draft tokens: the last n tokens
of the request's context (prompt + output; n from `prompt_lookup_max` down to
`prompt_lookup_min`) are looked up earlier in the context, and the k tokens that followed their
most recent earlier occurrence are proposed. The step computes the last sampled token and the
drafts (1 + k query tokens over the paged KV); the workers verify them (worker/speculative.py)
and return the accepted drafts plus one token of their own; the scheduler rolls back the KV
slots of the rejected drafts (`Scheduler._apply_speculative`).

Requests that do not speculate (they decode one token a step as without speculation): those
with a grammar (structured output), logit_bias, min_tokens or a penalty, and sampled requests
(temperature > 0) with top-k, top-p or min-p truncation.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shardline.engine.request import SamplingParams

METHODS = ("ngram", "draft_model")
_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "model")
_NGRAM_KEYS = ("prompt_lookup_max", "prompt_lookup_min")


class SpeculativeConfigError(ValueError):
    """A speculative_config that cannot be honoured; the message names the offending key."""


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding settings (vLLM's names)."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: str | None = None
    """The draft model (method "draft_model"): a path or name as EngineConfig.model takes."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SpeculativeConfigError(
                f"speculative_config method {self.method!r} is not supported (supported: "
                f"{', '.join(METHODS)})"
            )
        if self.method == "draft_model" and not (isinstance(self.model, str) and self.model.strip()):
            raise SpeculativeConfigError(
                "speculative_config method 'draft_model' needs a model (a path or name of a model "
                f"with the target's tokenizer), got {self.model!r}"
            )
        if self.method != "draft_model" and self.model is not None:
            raise SpeculativeConfigError(
                f"speculative_config model is for method 'draft_model', not {self.method!r}"
            )
        for key in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpeculativeConfigError(
                    f"speculative_config {key} must be an integer >= 1, got {value!r}"
                )
        if self.num_speculative_tokens > 32:
            raise SpeculativeConfigError(
                f"speculative_config num_speculative_tokens must be <= 32, got {self.num_speculative_tokens}"
            )
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise SpeculativeConfigError(
                f"speculative_config prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                f"prompt_lookup_max ({self.prompt_lookup_max})"
            )

    @classmethod
    def parse(cls, value: SpeculativeConfig | Mapping[str, Any] | str) -> SpeculativeConfig:
        """From a mapping (Python API), a JSON object (the command line) or a config."""
        if isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise SpeculativeConfigError(
                    f"speculative_config is not valid JSON: {exc}"
                ) from exc
        if not isinstance(value, Mapping):
            raise SpeculativeConfigError(f"speculative_config must be a JSON object, got {value!r}")
        if "method" not in value and "model" in value:
            value = {**value, "method": "draft_model"}  # as vLLM: a model without a method
        if value.get("method", "ngram") not in METHODS:
            cls(method=value["method"])  # raises, naming the method
        unknown = sorted(str(k) for k in value if k not in _KEYS)
        if unknown:
            raise SpeculativeConfigError(
                f"speculative_config key(s) {', '.join(unknown)} not supported (supported: {', '.join(_KEYS)})"
            )
        if "method" not in value:
            raise SpeculativeConfigError(
                "speculative_config needs a method (supported: ngram) or a model (a draft model)"
            )
        if "num_speculative_tokens" not in value:
            raise SpeculativeConfigError(
                "speculative_config needs num_speculative_tokens (as vLLM)"
            )
        settings = dict(value)
        if settings["method"] == "draft_model":
            ngram_only = sorted(k for k in _NGRAM_KEYS if k in settings)
            if ngram_only:
                raise SpeculativeConfigError(
                    f"speculative_config {', '.join(ngram_only)} is for method 'ngram', not 'draft_model'"
                )
            return cls(**settings)
        # As vLLM: neither lookup bound given: both 5; one given: the other equals it.
        low, high = settings.get("prompt_lookup_min"), settings.get("prompt_lookup_max")
        if low is None and high is None:
            low = high = 5
        settings["prompt_lookup_min"] = high if low is None else low
        settings["prompt_lookup_max"] = low if high is None else high
        return cls(**settings)


def speculates(params: SamplingParams) -> bool:
    """Whether a request's tokens may be drafted and verified (see the module docstring)."""
    if (
        params.structured_output is not None
        or params.logit_bias
        or params.min_tokens
        or params.presence_penalty
        or params.frequency_penalty
        or params.repetition_penalty != 1.0
    ):
        return False
    if params.temperature == 0.0 or params.top_k == 1:
        return True
    return params.top_k in (0, -1) and params.top_p == 1.0 and params.min_p == 0.0


def propose_ngram(token_ids: list[int], k: int, lookup_min: int, lookup_max: int) -> list[int]:
    """Up to `k` tokens that followed the most recent earlier occurrence of the context's last
    n tokens (the longest n in [lookup_min, lookup_max] that occurs); [] when none does."""
    size = len(token_ids)
    if k < 1 or size < lookup_min + 1:
        return []
    # Search the 4-byte packed context with bytes.rfind (C speed); a hit must be aligned.
    packed = array("i", token_ids).tobytes()
    for n in range(min(lookup_max, size - 1), lookup_min - 1, -1):
        pattern = packed[4 * (size - n) :]
        end = 4 * (size - 1)  # an occurrence ends before the last token: not the suffix itself
        while True:
            at = packed.rfind(pattern, 0, end)
            if at < 0:
                break
            if at % 4 == 0:
                start = at // 4 + n
                return token_ids[start : start + k]
            end = at + len(pattern) - 1
    return []
