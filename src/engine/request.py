"""Requests as the engine sees them: sampling parameters, scheduler-side state, outputs.

`SamplingParams` is what a user passes; it validates itself on construction (no I/O) and
raises `InvalidRequestError` naming the field. `validate_request` adds the checks that need
the model (context length, vocabulary). `Request` is the mutable per-request state owned by
the scheduler; `RequestOutput` is what `Engine.generate` yields.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import Enum, StrEnum
from types import MappingProxyType
from typing import Any

from shardline.engine.errors import InvalidRequestError, PromptTooLongError
from shardline.engine.structured_output import GrammarMatcher, StructuredOutputSpec
from shardline.transport.messages import SamplingOptions

MAX_LOGPROBS = 20  # the default cap (EngineConfig.max_logprobs); the engine enforces its own
MAX_N = 128  # choices per request (`n`), OpenAI's bound


# Stop strings are matched by one automaton per request (engine/detokenizer.py), built in time
# linear in their total length; these bound what one request can make the event loop do.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 512

# logit_bias: OpenAI's range for a bias; the number of entries one request may carry (OpenAI
# documents none; each entry costs the sampler one scatter element per step).
LOGIT_BIAS_LIMIT = 100.0
MAX_LOGIT_BIAS_ENTRIES = 1024


class FinishReason(StrEnum):
    """Why a request stopped producing tokens (the wire/user form is the string value)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


def _is_int(value: Any) -> bool:
    # bool is an int subclass; `max_tokens=True` is a bug in the caller, not the number 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _check_range(field: str, value: Any, low: float, high: float) -> None:
    if not _is_number(value) or not low <= value <= high:
        raise InvalidRequestError(field, f"must be a number in [{low}, {high}], got {value!r}")


def _logit_bias_key(key: Any) -> int:
    """A logit_bias key as a token id: an int, or a string of decimal digits (JSON keys)."""
    if _is_int(key):
        token_id = key
    elif isinstance(key, str) and re.fullmatch(r"-?[0-9]{1,18}", key):
        token_id = int(key)
    else:
        raise InvalidRequestError("logit_bias", f"keys must be token ids (integers), got {key!r:.50}")
    if token_id < 0:
        raise InvalidRequestError("logit_bias", f"token ids must be >= 0, got {token_id}")
    return int(token_id)


def _normalize_logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """`{token_id: bias}` (or (id, bias) pairs, as stored) as sorted, checked (id, bias) pairs."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, tuple | list) and all(isinstance(p, tuple | list) and len(p) == 2 for p in value):
        items = [tuple(p) for p in value]
    else:
        raise InvalidRequestError("logit_bias", f"must be a mapping {{token_id: bias}}, got {value!r:.200}")
    if len(items) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidRequestError(
            "logit_bias", f"at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(items)}"
        )
    pairs: dict[int, float] = {}
    for key, bias in items:
        token_id = _logit_bias_key(key)
        if not _is_number(bias) or not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
            raise InvalidRequestError(
                "logit_bias",
                f"the bias of token {token_id} must be a number in [-100, 100], got {bias!r:.50}",
            )
        if token_id in pairs:
            raise InvalidRequestError("logit_bias", f"token id {token_id} is given twice")
        pairs[token_id] = float(bias)
    return tuple(sorted(pairs.items()))


# The fields a model's generation_config.json may give a default to (vLLM's list, with HF's
# max_new_tokens as max_tokens), each with the built-in default that applies when neither the
# request nor the model sets it.
BUILTIN_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {"max_tokens": 16, "temperature": 1.0, "top_k": -1, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}
)


@dataclass(frozen=True, slots=True, init=False)
class SamplingParams:
    """How to sample one request; validated on construction.

    `top_k` -1 or 0 means off; `temperature` 0 means greedy; `logprobs` k returns the sampled
    token's logprob plus the top k (0..20); `timeout` (seconds) bounds the whole request.
    `stop` / `stop_token_ids` accept a list (or, for `stop`, a single string) and are stored
    as tuples so the object stays hashable and immutable.

    `n` (1..MAX_N) asks for that many choices of the one prompt: `Engine.generate` yields
    every choice's outputs, each with its `RequestOutput.index`; with a `seed`, choice i
    samples with `seed + i`. `include_stop_str_in_output` keeps the stop string that ended
    the request at the end of its text (vLLM's option; by default it is cut off).

    `max_tokens`, `temperature`, `top_k`, `top_p`, `min_p` and `repetition_penalty` left out
    (or None) are the model's to choose: when the request is submitted they take the values of
    the model's generation_config.json (`EngineConfig.generation_config`), else the built-in
    ones (`BUILTIN_DEFAULTS`: 16, 1.0, -1, 1.0, 0.0, 1.0). Until then they read as the
    built-in values, and `model_default_fields` names them. A value given explicitly always
    wins. (`dataclasses.replace` passes every field, so its copy has them all explicit.)

    `logit_bias` ({token_id: bias}, bias in [-100, 100], at most MAX_LOGIT_BIAS_ENTRIES
    entries; int-like string keys such as "50256" are accepted, as JSON gives them) is added
    to the model's logits before penalties, temperature and sampling: -100 in effect bans a
    token, +100 in effect forces it. It is stored as `(token_id, bias)` pairs sorted by id.
    `min_tokens` k: until k tokens were generated, no EOS id (the model's, whatever
    `ignore_eos`) and no `stop_token_ids` can be sampled (their logits are -inf), and stop
    strings end the request only in text of the tokens after the k-th (as vLLM).
    `prompt_logprobs` k (0..the engine's max_logprobs, 20 by default): the first output carries `RequestOutput.prompt_logprobs`,
    each prompt token's logprob given the tokens before it plus the top k (the first prompt
    token's entry is None); such a request takes no prefix-cache hits (as vLLM). Every logprob
    returned (`logprobs`, `prompt_logprobs`) is of the model's raw distribution, before
    `logit_bias`, `min_tokens`, penalties and temperature (vLLM's default).

    `structured_output` (a `structured_output.StructuredOutputSpec`: a JSON schema, any JSON
    object, a regex, a choice or a grammar) constrains every sampled token to the grammar
    (docs/STRUCTURED_OUTPUT.md): tokens it forbids get -inf before `logit_bias`, penalties and
    sampling; an EOS id is allowed exactly when the output so far is complete; once the grammar
    can take nothing more the request ends with finish_reason "stop" (with `ignore_eos` too).
    The engine compiles it when the request is submitted (`InvalidRequestError` naming
    `spec.field` for a grammar it cannot enforce). Logprobs stay those of the raw distribution.
    """

    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    logprobs: int | None
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    n: int
    skip_special_tokens: bool
    include_stop_str_in_output: bool
    timeout: float | None
    logit_bias: tuple[tuple[int, float], ...]
    min_tokens: int
    prompt_logprobs: int | None
    structured_output: StructuredOutputSpec | None
    model_default_fields: frozenset[str] = field(init=False, repr=False)

    def __init__(
        self,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = (),
        stop_token_ids: Sequence[int] | None = (),
        ignore_eos: bool = False,
        logprobs: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float | None = None,
        n: int = 1,
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
        timeout: float | None = None,
        logit_bias: Mapping[int | str, float] | Iterable[tuple[int, float]] | None = None,
        min_tokens: int = 0,
        prompt_logprobs: int | None = None,
        structured_output: StructuredOutputSpec | None = None,
    ) -> None:
        set_ = object.__setattr__  # frozen
        left_out = []
        for name, value in (
            ("max_tokens", max_tokens),
            ("temperature", temperature),
            ("top_k", top_k),
            ("top_p", top_p),
            ("min_p", min_p),
            ("repetition_penalty", repetition_penalty),
        ):
            if value is None:
                left_out.append(name)
                value = BUILTIN_DEFAULTS[name]
            set_(self, name, value)
        set_(self, "model_default_fields", frozenset(left_out))
        set_(self, "seed", seed)
        set_(self, "stop", stop)
        set_(self, "stop_token_ids", stop_token_ids)
        set_(self, "ignore_eos", ignore_eos)
        set_(self, "logprobs", logprobs)
        set_(self, "presence_penalty", presence_penalty)
        set_(self, "frequency_penalty", frequency_penalty)
        set_(self, "n", n)
        set_(self, "skip_special_tokens", skip_special_tokens)
        set_(self, "include_stop_str_in_output", include_stop_str_in_output)
        set_(self, "timeout", timeout)
        set_(self, "logit_bias", logit_bias)
        set_(self, "min_tokens", min_tokens)
        set_(self, "prompt_logprobs", prompt_logprobs)
        set_(self, "structured_output", structured_output)
        self._validate()

    def _validate(self) -> None:
        # Normalize container fields first so the checks below see tuples.
        stop: Any = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if stop is None:
            stop = ()
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequestError("stop", f"must be a list of non-empty strings, got {stop!r:.200}")
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
        longest = max((len(s) for s in stop), default=0)
        if longest > MAX_STOP_STRING_CHARS:
            raise InvalidRequestError(
                "stop", f"a stop string may be at most {MAX_STOP_STRING_CHARS} characters, got one of {longest}")
        object.__setattr__(self, "stop", tuple(stop))

        stop_ids: Any = self.stop_token_ids
        if stop_ids is None:
            stop_ids = ()
        if (
            isinstance(stop_ids, str | bytes)
            or not isinstance(stop_ids, Sequence)
            or not all(_is_int(t) and t >= 0 for t in stop_ids)
        ):
            raise InvalidRequestError(
                "stop_token_ids", f"must be a list of non-negative token ids, got {stop_ids!r}"
            )
        object.__setattr__(self, "stop_token_ids", tuple(stop_ids))

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidRequestError(
                "max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}"
            )
        if not _is_number(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(
                "temperature", f"must be a finite number >= 0, got {self.temperature!r}"
            )
        if not _is_int(self.top_k) or self.top_k < -1:
            raise InvalidRequestError(
                "top_k", f"must be -1 or 0 (off) or a positive integer, got {self.top_k!r}"
            )
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        _check_range("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None and not _is_int(self.seed):
            raise InvalidRequestError("seed", f"must be an integer or None, got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError("ignore_eos", f"must be a bool, got {self.ignore_eos!r}")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or self.logprobs < 0
        ):
            raise InvalidRequestError(
                "logprobs",
                f"must be None or an integer >= 0 (at most the engine's max_logprobs), got {self.logprobs!r}",
            )
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidRequestError(
                "repetition_penalty", f"must be a number > 0, got {self.repetition_penalty!r}"
            )
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise InvalidRequestError(
                "n", f"must be an integer in [1, {MAX_N}] (choices per request), got {self.n!r}"
            )
        for name in ("skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(name, f"must be a bool, got {getattr(self, name)!r}")
        if self.timeout is not None and (not _is_number(self.timeout) or self.timeout <= 0):
            raise InvalidRequestError(
                "timeout", f"must be None or a number of seconds > 0, got {self.timeout!r}"
            )
        object.__setattr__(self, "logit_bias", _normalize_logit_bias(self.logit_bias))
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise InvalidRequestError("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        # A max_tokens left to the model is checked once it is chosen (with_model_defaults
        # builds the final parameters through this same check).
        if "max_tokens" not in self.model_default_fields and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                "min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        if self.prompt_logprobs is not None and (
            not _is_int(self.prompt_logprobs) or self.prompt_logprobs < 0
        ):
            raise InvalidRequestError(
                "prompt_logprobs",
                f"must be None or an integer >= 0 (at most the engine's max_logprobs), got {self.prompt_logprobs!r}",
            )
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutputSpec):
            raise InvalidRequestError(
                "structured_output",
                f"must be a StructuredOutputSpec or None, got {type(self.structured_output).__name__}",
            )

    def with_model_defaults(
        self, defaults: Mapping[str, Any], *, max_tokens_cap: int | None = None
    ) -> SamplingParams:
        """These parameters with every field left to the model taken from `defaults` (the
        model's generation_config values by SamplingParams name); explicit values stay.

        A `max_tokens` the request left out is also capped at `max_tokens_cap` (the context
        left after the prompt), as vLLM's server caps its default: the caller asked for no
        particular length, so the request ends at the context's end instead of being refused.
        """
        unset = self.model_default_fields
        chosen = {name: defaults[name] for name in unset if defaults.get(name) is not None}
        if "max_tokens" in unset and max_tokens_cap is not None:
            if chosen.get("max_tokens", self.max_tokens) > max_tokens_cap:
                chosen["max_tokens"] = max(1, max_tokens_cap)
        if not chosen:
            return self
        kwargs: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in unset}
        del kwargs["model_default_fields"]
        kwargs.update(chosen)
        return SamplingParams(**kwargs)

    @property
    def greedy(self) -> bool:
        """True when sampling is argmax (temperature 0)."""
        return self.temperature == 0

    def to_options(
        self, *, eos_token_ids: Iterable[int] = (), num_output_tokens: int = 0
    ) -> SamplingOptions:
        """The subset of these parameters the workers need to sample (INTERFACES.md section 1).

        `eos_token_ids` are the model's (masked with `stop_token_ids` while `min_tokens` is not
        reached); `num_output_tokens` counts generated tokens the workers receive as part of the
        prompt (a request sent again in full after a worker restart): `min_tokens` counts from
        there, and the prompt's logprobs, already returned with the first output, are not asked
        again.
        """
        min_tokens = max(0, self.min_tokens - num_output_tokens)
        stop_ids = sorted({*eos_token_ids, *self.stop_token_ids}) if min_tokens else []
        return SamplingOptions(
            temperature=float(self.temperature),
            top_k=self.top_k if self.top_k > 0 else -1,
            top_p=float(self.top_p),
            min_p=float(self.min_p),
            seed=self.seed,
            presence_penalty=float(self.presence_penalty),
            frequency_penalty=float(self.frequency_penalty),
            repetition_penalty=float(self.repetition_penalty),
            num_logprobs=self.logprobs,
            logit_bias_ids=[token_id for token_id, _ in self.logit_bias],
            logit_bias_values=[bias for _, bias in self.logit_bias],
            min_tokens=min_tokens,
            min_tokens_stop_ids=stop_ids,
            prompt_logprobs=self.prompt_logprobs if num_output_tokens == 0 else None,
        )


def validate_request(
    prompt_token_ids: Sequence[int],
    params: SamplingParams,
    *,
    max_model_len: int,
    vocab_size: int,
) -> None:
    """Reject a request that cannot be served by this model before anything is scheduled.

    Like vLLM, the prompt plus `max_tokens` must fit in `max_model_len`, so a request never
    runs out of context halfway.
    """
    num_prompt = len(prompt_token_ids)
    if num_prompt == 0:
        raise InvalidRequestError("prompt", "the prompt is empty (it must have at least one token)")
    for token_id in prompt_token_ids:
        if not _is_int(token_id) or not 0 <= token_id < vocab_size:
            raise InvalidRequestError(
                "prompt", f"token id {token_id!r} is outside the vocabulary [0, {vocab_size})"
            )
    if num_prompt >= max_model_len:
        raise PromptTooLongError(
            f"the prompt has {num_prompt} tokens but the model's context length "
            f"(max_model_len) is {max_model_len}; at least one token must be left to generate"
        )
    if num_prompt + params.max_tokens > max_model_len:
        raise PromptTooLongError(
            f"the prompt ({num_prompt} tokens) plus max_tokens ({params.max_tokens}) is "
            f"{num_prompt + params.max_tokens}, more than max_model_len {max_model_len}; "
            f"lower max_tokens to at most {max_model_len - num_prompt}"
        )
    for token_id in params.stop_token_ids:
        if not 0 <= token_id < vocab_size:
            raise InvalidRequestError(
                "stop_token_ids",
                f"token id {token_id} is outside the vocabulary [0, {vocab_size})",
            )
    if params.min_tokens > params.max_tokens:  # (max_tokens as the model's defaults chose it)
        raise InvalidRequestError(
            "min_tokens",
            f"min_tokens ({params.min_tokens}) must not exceed max_tokens ({params.max_tokens})",
        )
    for token_id, _ in params.logit_bias:
        if token_id >= vocab_size:
            raise InvalidRequestError(
                "logit_bias", f"token id {token_id} is outside the vocabulary [0, {vocab_size})"
            )


class RequestStatus(Enum):
    """Where a request is in the scheduler's life cycle."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class Request:
    """Scheduler-side state of one request (mutable; owned by the scheduler).

    `num_computed_tokens` counts tokens of `all_token_ids` whose K/V are in the cache or are
    being computed by the step just scheduled (it advances at schedule time).
    `num_tokens_sent` counts how many of `all_token_ids` the workers already know: the prompt
    travels once, then every sampled token exactly once (INTERFACES.md section 1).
    `block_hashes` is owned by the KV-cache manager: the hash chain of this request's full blocks.
    """

    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "sampling_params",
        "eos_token_ids",
        "arrival_time",
        "output_token_ids",
        "num_computed_tokens",
        "num_cached_tokens",
        "status",
        "finish_reason",
        "num_preemptions",
        "num_tokens_sent",
        "block_hashes",
        "grammar",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams,
        eos_token_ids: Iterable[int] = (),
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        # Every id that ends the request (unless ignore_eos): the model's EOS ids. A frozenset,
        # shared by the engine's requests (frozenset(a frozenset) is that same object), so the
        # scheduler's per-token check is one hash lookup.
        self.eos_token_ids = frozenset(eos_token_ids)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_preemptions = 0
        self.num_tokens_sent = 0
        self.block_hashes: list[bytes] = []
        # SamplingParams.structured_output's matcher (engine-side; advanced by the scheduler as
        # sampled tokens are applied, never by a recompute).
        self.grammar: GrammarMatcher | None = None

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by every generated token (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_between(self, start: int, end: int | None = None) -> list[int]:
        """`all_token_ids[start:end]` without building the whole list (hot paths: O(end - start))."""
        prompt = self.prompt_token_ids
        num_prompt = len(prompt)
        if end is None:
            end = num_prompt + len(self.output_token_ids)
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        if end <= num_prompt:
            return prompt[start:end]
        return prompt[start:] + self.output_token_ids[: end - num_prompt]

    @property
    def num_prompt_tokens(self) -> int:
        """Number of prompt tokens."""
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Number of tokens generated so far."""
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        """True once the request stopped for any reason."""
        return self.status is RequestStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"prompt={self.num_prompt_tokens}, output={self.num_output_tokens}, "
            f"computed={self.num_computed_tokens}, sent={self.num_tokens_sent})"
        )


@dataclass
class TokenLogprob:
    """The logprob of a generated token and the top alternatives as (token_id, logprob);
    `rank`: the token's 1-based rank in the distribution (tokens with a logprob >= its own)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    rank: int | None = None


@dataclass(slots=True)
class RequestOutput:
    """One streamed update of a request: the new text/tokens and the cumulative ones.

    `index` is the choice this update belongs to (0..n-1 for `SamplingParams.n`; 0 for n=1);
    `request_id` is the caller's request id for every choice. Slotted: one is built per token
    of every streaming request.
    """

    request_id: str
    delta: str
    text: str
    delta_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None
    # The prompt's logprobs (SamplingParams.prompt_logprobs): one entry per prompt token, None
    # for the first; on the first output that carries tokens, None on the others.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    index: int = 0
