"""What the engine side needs to know about a model: path, tokenizer, limits, chat template,
EOS ids and default sampling settings (generation_config.json)."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shardline.engine.config import ConfigError, EngineConfig
from shardline.engine.errors import InvalidRequestError
from shardline.engine.request import SamplingParams

GENERATION_CONFIG_FILE = "generation_config.json"
# generation_config.json key -> SamplingParams field (the keys vLLM takes as defaults)
_GENERATION_DEFAULT_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


@dataclass(frozen=True)
class ModelInfo:
    """The engine-side view of a model; the weights themselves live in the workers."""

    name: str
    path: pathlib.Path
    tokenizer: Any
    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    """Every id that ends a request (unless it asks ignore_eos): config.json's eos_token_id,
    the tokenizer's EOS and generation_config.json's eos_token_id (an int or a list)."""
    hf_config: Any
    max_token_chars: int = 1 << 20
    """The most characters one token of the vocabulary spans (a text longer than
    max_model_len times this cannot fit, whatever its tokens)."""
    generation_defaults: Mapping[str, Any] = field(default_factory=dict)
    """SamplingParams defaults from generation_config.json, by field name (max_new_tokens as
    max_tokens); fill the fields a request leaves out (`SamplingParams.with_model_defaults`)."""

    def apply_chat_template(
        self, messages: list[dict[str, Any]], template_kwargs: Mapping[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of `messages` formatted by the model's chat template, ready for a reply.

        The template writes its own special tokens (BOS included), so the text is encoded
        without the tokenizer's: a Llama tokenizer would otherwise add a second BOS.
        `template_kwargs` (vLLM's `chat_template_kwargs`, checked by
        `check_chat_template_kwargs`) reach the template as variables, and may set
        `add_generation_prompt` (default True) or `continue_final_message`. `tools` (OpenAI's
        tool definitions) reach the template as transformers passes them (`tools=`).
        """
        options = chat_template_options(template_kwargs)
        if tools is not None:
            options["tools"] = tools
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, **options)
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a text prompt, with the special tokens the tokenizer itself adds (as
        vLLM does): a Llama tokenizer's BOS, nothing for one that defines none (SmolLM2)."""
        return [int(t) for t in self.tokenizer.encode(prompt)]


# apply_chat_template's own parameters: not template variables, so chat_template_kwargs may not
# set them (add_generation_prompt and continue_final_message it may, as in vLLM).
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "tokenize", "padding", "truncation",
    "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
    "sanitize_control_tokens",
})  # fmt: skip


def check_chat_template_kwargs(template_kwargs: Any) -> None:
    """Refuse `chat_template_kwargs` that are not a mapping of template variables
    (InvalidRequestError naming the field)."""
    if template_kwargs is None:
        return
    if not isinstance(template_kwargs, Mapping) or not all(isinstance(k, str) for k in template_kwargs):
        raise InvalidRequestError("chat_template_kwargs", f"must be an object of template variables, got "
                                  f"{template_kwargs!r:.200}")
    reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(template_kwargs))
    if reserved:
        raise InvalidRequestError("chat_template_kwargs", f"may not set {', '.join(map(repr, reserved))}: a "
                                  "parameter of the template renderer, not a template variable")
    for name in ("add_generation_prompt", "continue_final_message"):
        if not isinstance(template_kwargs.get(name, False), bool):
            raise InvalidRequestError("chat_template_kwargs", f"{name} must be true or false, got "
                                      f"{template_kwargs[name]!r:.200}")


def chat_template_options(template_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The keyword arguments of `tokenizer.apply_chat_template` for a reply: the generation
    prompt on, unless `template_kwargs` (checked here) say otherwise."""
    check_chat_template_kwargs(template_kwargs)
    options: dict[str, Any] = {"add_generation_prompt": True, **(template_kwargs or {})}
    if options.get("continue_final_message") and "add_generation_prompt" not in (template_kwargs or {}):
        options["add_generation_prompt"] = False  # vLLM's continue_final_message implies no new turn
    return options


@dataclass(frozen=True)
class ModelLocation:
    """Where a model is and what its config.json says: all that starting its workers needs
    (`locate_model`, quick once the model is cached); `load_model_info` adds the tokenizer."""

    name: str
    path: pathlib.Path
    model_config: Any  # shardline.model.config.ModelConfig

    @property
    def max_model_len(self) -> int:
        return int(self.model_config.max_model_len)

    @property
    def kv_sliding_window(self) -> int | None:
        """The window every layer attends over (None: some layer reads the whole context):
        the KV cache gives back blocks before a request's window only with one (issue 24)."""
        from shardline.model.config import uniform_sliding_window

        return uniform_sliding_window(self.model_config.hf_config)


def locate_model(config: EngineConfig) -> ModelLocation:
    """Resolve `config.model` (fetching the default model on first use), read its config and
    refuse sharding it cannot take (blocking)."""
    from shardline.model.config import ModelConfig
    from shardline.model.fetch import resolve_model_path

    try:
        path = resolve_model_path(config.model)
        model_config = ModelConfig.from_path(
            str(path), architecture=config.model_arch, max_model_len=config.max_model_len
        )
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:  # no such model, no config.json, a context too long...
        field = "max_model_len" if str(exc).startswith("max_model_len") else "model"
        raise ConfigError(field, str(exc)) from exc
    check_parallel_sizes(config, model_config.hf_config)
    name = config.model if not pathlib.Path(config.model).exists() else path.name
    return ModelLocation(name=name, path=path, model_config=model_config)


def load_model_info(config: EngineConfig, location: ModelLocation | None = None) -> ModelInfo:
    """Describe `config.model` for the engine: tokenizer, EOS ids, generation defaults
    (blocking; `Engine.start` runs it while the workers load)."""
    from shardline.engine.tokenizer import load_tokenizer

    location = location or locate_model(config)
    path, hf = location.path, location.model_config.hf_config
    tokenizer = load_tokenizer(path, chat_template=config.chat_template)
    _compile_chat_template(tokenizer)
    generation, generation_file = read_generation_config(config.generation_config, path)
    # "vllm" keeps the model's EOS ids (as vLLM does) and drops only its sampling defaults.
    defaults = {} if config.generation_config == "vllm" else generation_defaults(generation, source=str(generation_file))
    eos_ids = {
        *_token_ids(getattr(hf, "eos_token_id", None)),
        *_token_ids(getattr(tokenizer, "eos_token_id", None)),
        *_token_ids(generation.get("eos_token_id")),
    }
    return ModelInfo(
        name=location.name,
        path=path,
        tokenizer=tokenizer,
        max_model_len=location.max_model_len,
        vocab_size=int(hf.vocab_size),
        eos_token_ids=frozenset(eos_ids),
        hf_config=hf,
        generation_defaults=defaults,
        max_token_chars=_max_token_chars(tokenizer),
    )


def check_model_config(config: EngineConfig) -> ModelLocation:
    """Every check of `config` that reads the model but starts nothing: its path and
    config.json (sharding, max_model_len), the generation config, the chat template and the
    dtype. `shardline serve` runs it before the server starts, so a mistake is a ConfigError
    naming the setting (one line, exit 2) rather than a failed start. Blocking."""
    from shardline.engine.tokenizer import read_chat_template

    location = locate_model(config)
    generation, generation_file = read_generation_config(config.generation_config, location.path)
    if config.generation_config != "vllm":
        generation_defaults(generation, source=str(generation_file))
    if config.chat_template is not None:
        read_chat_template(config.chat_template)
    _ = config.torch_dtype_name  # "auto" on CUDA reads the checkpoint's dtype
    return location


def _max_token_chars(tokenizer: Any) -> int:
    """An upper bound on the characters one token decodes to: its longest vocabulary entry
    (byte-level and SentencePiece vocabularies write at least one symbol per byte)."""
    try:
        return max(1, max(len(token) for token in tokenizer.get_vocab()))
    except Exception:  # noqa: BLE001 - no vocabulary to read: no bound from it
        return 1 << 20


def _compile_chat_template(tokenizer: Any) -> None:
    """Render the chat template once now (it compiles on first use: ~50 ms of the first chat
    request otherwise), while the workers start. A template that fails here fails again, with
    its error, on the request that meets it."""
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - see the docstring
        pass


def read_generation_config(
    setting: str, model_path: pathlib.Path
) -> tuple[dict[str, Any], pathlib.Path | None]:
    """The generation_config.json that `EngineConfig.generation_config` names: (its values,
    the file read).

    "auto" and "vllm": the model directory's file, or nothing when it has none (with "vllm"
    the caller takes only its EOS ids); "none": nothing; anything else: a folder holding the
    file (or the file itself), which must exist.
    """
    if setting == "none":
        return {}, None
    if setting in ("auto", "vllm"):
        if not model_path.is_dir() or not (model_path / GENERATION_CONFIG_FILE).is_file():
            return {}, None
        file = model_path / GENERATION_CONFIG_FILE
    else:
        file = pathlib.Path(setting).expanduser()
        if file.is_dir():
            file = file / GENERATION_CONFIG_FILE
        if not file.is_file():
            raise ConfigError(
                "generation_config",
                f"{setting!r} is not 'auto', 'vllm', 'none' or a folder holding {GENERATION_CONFIG_FILE}",
            )
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError("generation_config", f"cannot read {str(file)!r}: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError("generation_config", f"{str(file)!r} is not a JSON object")
    return values, file


def generation_defaults(generation: Mapping[str, Any], *, source: str = GENERATION_CONFIG_FILE) -> dict[str, Any]:
    """The SamplingParams defaults a generation_config holds, checked as SamplingParams checks
    a request's values (a bad one is refused at start, naming the file's key).

    Like vLLM, `do_sample` is not read: a temperature the file gives applies as it stands.
    """
    defaults = {
        name: generation[key]
        for key, name in _GENERATION_DEFAULT_KEYS.items()
        if generation.get(key) is not None
    }
    try:
        SamplingParams(**defaults)
    except InvalidRequestError as exc:
        key = next((k for k, n in _GENERATION_DEFAULT_KEYS.items() if n == exc.field), exc.field)
        raise ConfigError("generation_config", f"{source} has a bad {key}: {exc.message}") from exc
    return defaults


def checkpoint_dtype(model: str) -> str | None:
    """The dtype a checkpoint's config.json names (`torch_dtype`, or `dtype` as newer
    transformers writes it), by its torch name; None when it names none."""
    from shardline.model.config import ModelConfig
    from shardline.model.fetch import resolve_model_path

    hf = ModelConfig.from_path(str(resolve_model_path(model))).hf_config
    value = getattr(hf, "torch_dtype", None) or getattr(hf, "dtype", None)
    return str(value).removeprefix("torch.") if isinstance(value, str) and value else None


def check_logprobs_cap(params: SamplingParams, *, max_logprobs: int, vocab_size: int) -> None:
    """Refuse a request asking for more log-probabilities per token than the engine's
    `max_logprobs` (-1: the vocabulary) allows, naming the field."""
    cap = vocab_size if max_logprobs == -1 else min(max_logprobs, vocab_size)
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name, None)
        if isinstance(value, int) and value > cap:
            raise InvalidRequestError(
                name, f"at most {cap} log-probabilities per token (the server's --max-logprobs), got {value}"
            )


def _token_ids(value: Any) -> list[int]:
    """An eos_token_id entry (an int, a list of ints, or None) as a list of ids."""
    items = value if isinstance(value, list | tuple) else [value]
    return [int(t) for t in items if isinstance(t, int) and not isinstance(t, bool) and t >= 0]


def check_parallel_sizes(config: EngineConfig, hf_config: Any) -> None:
    """Refuse sharding the model cannot take, naming the numbers."""
    tp = config.tensor_parallel_size
    heads = int(hf_config.num_attention_heads)
    if heads % tp:
        raise ConfigError(
            "tensor_parallel_size",
            f"{tp} does not divide the model's {heads} attention heads",
        )
    kv_heads = int(getattr(hf_config, "num_key_value_heads", heads) or heads)
    if kv_heads % tp and tp % kv_heads:
        raise ConfigError(
            "tensor_parallel_size",
            f"{tp} neither divides nor is a multiple of the model's {kv_heads} KV heads",
        )
    check_expert_parallel(config, hf_config)
    layers = int(hf_config.num_hidden_layers)
    if config.pipeline_parallel_size > layers:
        raise ConfigError(
            "pipeline_parallel_size",
            f"{config.pipeline_parallel_size} stages for a model of {layers} layers",
        )


def check_expert_parallel(config: EngineConfig, hf_config: Any) -> None:
    """Expert parallelism (issue 24): a MoE model's experts must spread evenly over the TP
    ranks; refused naming the numbers."""
    from shardline.model.config import check_expert_split, num_experts_of

    experts = num_experts_of(hf_config)
    if config.enable_expert_parallel and experts:
        try:
            check_expert_split(experts, config.tensor_parallel_size)
        except ValueError as exc:
            raise ConfigError("enable_expert_parallel", str(exc)) from None
