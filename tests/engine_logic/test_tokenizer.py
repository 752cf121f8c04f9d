"""shardline's FastTokenizer gives transformers' AutoTokenizer results, without transformers.

Each comparison loads the same directory both ways and checks encodings (with and without
special tokens), decodings (with and without skipping them), the chat template (with and
without the generation prompt, with a system message and tools, and the template's own error),
and the special tokens.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

import pytest

from shardline.engine.tokenizer import FastTokenizer, load_tokenizer

TEXTS = ["Hello world!", "  leading spaces and\ttabs\n\nnewlines", "naïve café — 東京 🚀",
         "<|im_start|>user\nhi<|im_end|>", "don't stop , really ?", ""]
CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tell me more"}],
]


def _both(path: pathlib.Path) -> tuple[FastTokenizer, Any]:
    from transformers import AutoTokenizer

    ours = load_tokenizer(path)
    assert isinstance(ours, FastTokenizer)
    return ours, AutoTokenizer.from_pretrained(str(path))


def _hf_ids(ids: Any) -> list[int]:
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _compare(ours: FastTokenizer, hf: Any) -> None:
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special), text
        ids = hf.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    for chat in CHATS:
        for gen in (True, False):
            assert ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False) == \
                hf.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == \
                _hf_ids(hf.apply_chat_template(chat, add_generation_prompt=gen))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, name) == getattr(hf, name), name
    assert ours.eos_token == hf.eos_token and ours.bos_token == hf.bos_token
    assert set(ours.all_special_ids) == set(hf.all_special_ids)
    assert ours.vocab_size == hf.vocab_size and len(ours) == len(hf)


def test_the_default_model_tokenizes_as_transformers(smollm2_dir: pathlib.Path) -> None:
    _compare(*_both(smollm2_dir))


def _tiny(tmp_path: pathlib.Path, **config: Any) -> pathlib.Path:
    from support.tiny_models import write_tiny_tokenizer

    tmp_path.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(tmp_path)
    path = tmp_path / "tokenizer_config.json"
    data = json.loads(path.read_text())
    data.update(config)
    path.write_text(json.dumps(data))
    return tmp_path


def test_a_tokenizer_whose_post_processor_adds_bos_matches(tmp_path: pathlib.Path) -> None:
    """A BOS that tokenizer.json's post-processor adds (as Llama 3's does) is added to text
    prompts, never to chat templates (which write their own), as with transformers."""
    from tokenizers import Tokenizer, processors

    path = _tiny(tmp_path, bos_token="<|im_start|>")
    backend = Tokenizer.from_file(str(path / "tokenizer.json"))
    bos = backend.token_to_id("<|im_start|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B", special_tokens=[("<|im_start|>", bos)])
    backend.save(str(path / "tokenizer.json"))
    ours, hf = _both(path)
    assert ours.encode("hi")[0] == bos and ours.encode("hi", add_special_tokens=False)[0] != bos
    assert ours.apply_chat_template(CHATS[0]).count(bos) == 1
    _compare(ours, hf)


def test_tools_and_template_kwargs_reach_the_template(tmp_path: pathlib.Path) -> None:
    template = ("{% if tools %}TOOLS={{ tools | tojson }}\n{% endif %}{% for m in messages %}"
                "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if flavour %}[{{ flavour }}]{% endif %}"
                "{% if add_generation_prompt %}assistant:{% endif %}{{ eos_token }}")
    path = _tiny(tmp_path, chat_template=template)
    ours, hf = _both(path)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    kwargs = {"tools": tools, "flavour": "ünïcode", "add_generation_prompt": True, "tokenize": False}
    assert ours.apply_chat_template(CHATS[1], **kwargs) == hf.apply_chat_template(CHATS[1], **kwargs)


def test_a_template_error_is_raised_as_transformers_raises_it(tmp_path: pathlib.Path) -> None:
    import jinja2

    path = _tiny(tmp_path, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        load_tokenizer(path).apply_chat_template(CHATS[0])


def test_other_tokenizers_load_with_transformers(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model-specific class, or the switch, keeps transformers' AutoTokenizer."""
    path = _tiny(tmp_path, tokenizer_class="SomeModelTokenizer")
    from shardline.engine.tokenizer import fast_tokenizer_config

    assert fast_tokenizer_config(path) is None
    monkeypatch.setenv("SHARDLINE_TOKENIZER", "transformers")
    assert fast_tokenizer_config(_tiny(tmp_path / "other")) is None


def test_loading_the_engine_tokenizer_imports_no_transformers(tmp_path: pathlib.Path) -> None:
    """The point of it: the engine's process never pays for importing transformers or torch."""
    path = _tiny(tmp_path)
    code = ("import sys; from shardline.engine.tokenizer import load_tokenizer; "
            f"t = load_tokenizer({str(path)!r}); t.apply_chat_template([{{'role': 'user', 'content': 'x'}}]); "
            "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
