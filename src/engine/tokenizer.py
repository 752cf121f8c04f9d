"""The engine's tokenizer: the `tokenizers` library and the model's chat template, without
importing transformers.

Importing transformers and loading a tokenizer through `AutoTokenizer` took 2.3-4.3 s and
~290 MB of the engine process on a 2-core machine (benchmarks/RESULTS.md, start-up); the Rust
tokenizer it wraps loads in 0.13 s. `load_tokenizer` gives a `FastTokenizer` wherever it is
known to produce transformers' results: a `tokenizer.json` and a `tokenizer_class` of
transformers' generic fast-tokenizer family (`FAST_CLASSES`), whose encoding is the Rust
tokenizer's (its post-processor adds the special tokens, e.g. a BOS; transformers' generic
class ignores `add_bos_token` in tokenizer_config.json, and so does this), and whose chat template is rendered the way transformers renders it
(a sandboxed jinja2 environment with the same options, filters and globals; the special tokens
and `chat_template_kwargs` reach the template). Anything else (no tokenizer.json, a
model-specific class, a GGUF-only model) loads with transformers' `AutoTokenizer`, as before;
`SHARDLINE_TOKENIZER=transformers` forces that. tests/engine_logic/test_tokenizer.py compares
the two on encodings, decodings and chat templates.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

ENV = "SHARDLINE_TOKENIZER"
# transformers' classes that are its generic fast tokenizer (TokenizersBackend) with nothing of
# their own on the encode/decode path.
FAST_CLASSES = frozenset({
    "TokenizersBackend", "PreTrainedTokenizerFast", "GPT2Tokenizer", "GPT2TokenizerFast",
    "Qwen2Tokenizer", "Qwen2TokenizerFast",
})
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                 "mask_token")


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class FastTokenizer:
    """A transformers-compatible subset of a fast tokenizer: `encode`, `decode`,
    `convert_ids_to_tokens`, `convert_tokens_to_ids`, `apply_chat_template`, the special
    tokens and their ids, `vocab_size`, `len()`. `backend` is the `tokenizers.Tokenizer`."""

    def __init__(self, backend: Any, config: dict[str, Any], name_or_path: str = "") -> None:
        self.backend = backend
        self._tokenizer = backend  # where transformers keeps it (engine.detokenizer looks there)
        self.name_or_path = name_or_path
        self.init_kwargs = config
        self.chat_template: str | None = config.get("chat_template") if isinstance(
            config.get("chat_template"), str) else None
        self.model_max_length = int(config.get("model_max_length") or 0) or None
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        for name in SPECIAL_NAMES:
            setattr(self, name, _token_text(config.get(name)))
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        self.additional_special_tokens = [t for t in map(_token_text, extra) if t is not None] \
            if isinstance(extra, list) else []

    # ------------------------------------------------------------------ special tokens
    @property
    def all_special_tokens(self) -> list[str]:
        named = [t for name in SPECIAL_NAMES if (t := getattr(self, name)) is not None]
        return list(dict.fromkeys(named + self.additional_special_tokens))

    @property
    def all_special_ids(self) -> list[int]:
        return [i for i in self.convert_tokens_to_ids(self.all_special_tokens) if i is not None]

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {name: t for name in SPECIAL_NAMES if (t := getattr(self, name)) is not None}

    def __getattr__(self, name: str) -> Any:  # bos_token_id, eos_token_id, pad_token_id, ...
        if name.endswith("_token_id") and name[: -len("_id")] in SPECIAL_NAMES:
            token = getattr(self, name[: -len("_id")])
            return None if token is None else self.backend.token_to_id(token)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=False))

    def __len__(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def get_vocab(self) -> dict[str, int]:
        return dict(self.backend.get_vocab(with_added_tokens=True))

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch lets go of the GIL while it works (encode holds it: a 660k-character
        # prompt tokenized on a thread still froze the event loop for 1.4 s).
        return list(self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def decode(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str:
        if isinstance(ids, int):
            ids = [ids]
        text = str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))
        return _clean_up_spaces(text) if self.clean_up_tokenization_spaces else text

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> Any:
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> Any:
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, conversation: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
                            documents: list[dict[str, Any]] | None = None, chat_template: str | None = None,
                            add_generation_prompt: bool = False, continue_final_message: bool = False,
                            tokenize: bool = True, **kwargs: Any) -> Any:
        """transformers' `apply_chat_template` for one conversation: the text, or its token ids
        (encoded without special tokens: the template writes its own). Keys whose value is None
        are left out of each message, as transformers does; `kwargs` (vLLM's
        `chat_template_kwargs`) reach the template as variables; `continue_final_message` leaves
        the last message open, cut where its text ends, as transformers cuts it."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("the tokenizer has no chat template; pass one (--chat-template) or "
                             "send a text prompt instead")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible: "
                             "continue_final_message continues the final message, add_generation_prompt "
                             "starts a new assistant message")
        messages = [{key: value for key, value in m.items() if value is not None} for m in conversation]
        final = _tag_final_message(messages, template) if continue_final_message else None
        text = _compile(template).render(
            messages=messages, tools=tools, documents=documents,
            add_generation_prompt=add_generation_prompt, **{**self.special_tokens_map, **kwargs})
        if final is not None:
            text = _cut_at_tag(text, final)
        return self.encode(text, add_special_tokens=False) if tokenize else text


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message


def _tag_final_message(messages: list[dict[str, Any]], template: str) -> str:
    """Mark where the last message's text ends (transformers' way: a tag appended to it, found
    in the rendered text afterwards); returns the message's text."""
    if not messages:
        raise ValueError("continue_final_message is set but the conversation is empty!")
    last = messages[-1] = dict(messages[-1])
    final = last.get("content")
    if final is None:
        raise ValueError('continue_final_message is set but the final message has no "content" to continue!')
    if "content" not in template:
        raise ValueError('continue_final_message is set to "content" but this is not an accepted field in the '
                         "chat_template")
    if isinstance(final, list | tuple):
        blocks = last["content"] = [dict(block) for block in final]
        for block in reversed(blocks):
            if "text" in block:
                final = block["text"]
                block["text"] = block["text"] + _CONTINUE_TAG
                return str(final)
        raise ValueError("continue_final_message is set but we could not find any text to continue in the final "
                         "message!")
    last["content"] = final + _CONTINUE_TAG
    return str(final)


def _cut_at_tag(rendered: str, final: str) -> str:
    if final.strip() not in rendered or _CONTINUE_TAG.strip() not in rendered:
        raise ValueError("continue_final_message is set but the final message does not appear in the chat after "
                         "applying the chat template (the template changes or drops part of it)")
    at = rendered.rindex(_CONTINUE_TAG.strip())
    if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()


def _clean_up_spaces(text: str) -> str:
    """transformers' `clean_up_tokenization`."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    """The template compiled as transformers compiles chat templates (same environment options,
    filters, globals and the `generation` tag, rendered as its body)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(template)


def fast_tokenizer_config(path: pathlib.Path, chat_template: str | None = None) -> dict[str, Any] | None:
    """tokenizer_config.json (with the chat template from chat_template.jinja/.json if there is
    one, or `chat_template`'s text when given) when `FastTokenizer` can stand in for
    transformers on this model, else None."""
    if os.environ.get(ENV, "auto") == "transformers" or not (path / "tokenizer.json").is_file():
        return None
    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("tokenizer_class") not in FAST_CLASSES:
        return None
    if chat_template is not None:
        config["chat_template"] = chat_template
    if not isinstance(config.get("chat_template"), str):
        jinja = path / "chat_template.jinja"
        if jinja.is_file():
            config["chat_template"] = jinja.read_text(encoding="utf-8")
        elif config.get("chat_template") is not None:
            return None  # several named templates: transformers picks among them
    return config


def read_chat_template(value: str) -> str:
    """A --chat-template value as template text (as vLLM reads it): the file it names, else
    the value itself when it looks like jinja (has a brace or a newline)."""
    from shardline.engine.config import JINJA_MARKS, ConfigError

    try:
        return pathlib.Path(value).expanduser().read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        if any(mark in value for mark in JINJA_MARKS):
            return value
        raise ConfigError("chat_template", f"{value!r} looks like a file, but it cannot be read: {exc}") from exc


def load_tokenizer(path: str | os.PathLike[str], chat_template: str | None = None) -> Any:
    """A `FastTokenizer` where it matches transformers (see the module docstring), else
    transformers' `AutoTokenizer.from_pretrained(path)`. `chat_template` (a file or the jinja
    text, `read_chat_template`) replaces the tokenizer's own template."""
    root = pathlib.Path(path)
    if root.suffix == ".gguf" and root.is_file():
        root = gguf_tokenizer_dir(root)
    template = None if chat_template is None else read_chat_template(chat_template)
    config = fast_tokenizer_config(root, template) if root.is_dir() else None
    if config is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(root))
        if template is not None:
            tokenizer.chat_template = template
        return tokenizer
    from tokenizers import Tokenizer

    return FastTokenizer(Tokenizer.from_file(str(root / "tokenizer.json")), config, str(root))


_GGUF_TOKENIZER_CHILD = (
    "import sys\n"
    "from transformers import AutoTokenizer\n"
    "AutoTokenizer.from_pretrained(sys.argv[1], gguf_file=sys.argv[2]).save_pretrained(sys.argv[3])\n"
)


def gguf_tokenizer_dir(gguf_file: pathlib.Path) -> pathlib.Path:
    """A folder with the tokenizer (tokenizer.json, tokenizer_config.json, the chat template)
    that transformers builds from a bare GGUF file's metadata, converted once and cached under
    `$SHARDLINE_HOME/gguf_tokenizers/<key>` (the key covers the file's path, size and
    modification time), so a later start reads it without importing transformers.

    The conversion runs in a child process: importing transformers and reading the metadata of
    a 128k vocabulary left ~300 MiB in the engine's heap for as long as it served (measured on
    a Llama-3.2-1B-shaped file: 42 -> 340 MiB RSS)."""
    import hashlib
    import shutil
    import subprocess
    import sys
    import tempfile

    from shardline.model.fetch import shardline_home

    st = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    target = shardline_home() / "gguf_tokenizers" / key
    if (target / "tokenizer_config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
    try:
        child = subprocess.run(
            [sys.executable, "-c", _GGUF_TOKENIZER_CHILD, str(gguf_file.parent), gguf_file.name, str(work)],
            capture_output=True, text=True, check=False,
        )
        if child.returncode != 0:
            last = (child.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ValueError(f"cannot build a tokenizer from the metadata of {gguf_file}: {last}")
        os.replace(work, target)
    except OSError:  # another process cached it meanwhile: theirs is as good
        if not (target / "tokenizer_config.json").is_file():
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
