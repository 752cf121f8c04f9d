"""The chat template's options as vLLM's server passes them (issue 21): `chat_template_kwargs`,
`add_generation_prompt`, `continue_final_message`, and messages with `tool_calls` (null content)
or a `tool_call_id`. shardline's FastTokenizer must render them exactly as transformers does.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest

from shardline.engine.tokenizer import FastTokenizer, load_tokenizer

# A template in the shape of the tool-calling ones on the Hub (Qwen2.5, Llama 3.1): it reads
# tool_calls, tool_call_id, a kwarg of its own, and leaves the final message open on request.
TEMPLATE = (
    "{% if enable_thinking is defined and not enable_thinking %}<no-think>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is defined %}{{ m['content'] }}{% endif %}"
    "{% if m['tool_calls'] is defined %}{% for call in m['tool_calls'] %}<call>{{ call['function']['name'] }}"
    "{{ call['function']['arguments'] | tojson }}</call>{% endfor %}{% endif %}"
    "{% if m['tool_call_id'] is defined %} [for {{ m['tool_call_id'] }}]{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOL_CHAT: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "content": "22 C", "tool_call_id": "call_1"},
]
PREFILL_CHAT: list[dict[str, Any]] = [
    {"role": "user", "content": "Count to three."},
    {"role": "assistant", "content": "One, two,"},
]


@pytest.fixture
def tokenizers(tmp_path: pathlib.Path) -> tuple[FastTokenizer, Any]:
    from transformers import AutoTokenizer

    from support.tiny_models import write_tiny_tokenizer

    write_tiny_tokenizer(tmp_path)
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": TEMPLATE}))
    ours = load_tokenizer(tmp_path)
    assert isinstance(ours, FastTokenizer)
    return ours, AutoTokenizer.from_pretrained(str(tmp_path))


@pytest.mark.parametrize(
    "options",
    [
        {"add_generation_prompt": True},
        {"add_generation_prompt": True, "enable_thinking": False},
        {"add_generation_prompt": False, "enable_thinking": True},
    ],
)
def test_tool_messages_and_template_kwargs_render_as_transformers(
    tokenizers: tuple[FastTokenizer, Any], options: dict[str, Any]
) -> None:
    ours, hf = tokenizers
    text = ours.apply_chat_template(TOOL_CHAT, tokenize=False, **options)
    assert text == hf.apply_chat_template(TOOL_CHAT, tokenize=False, **options)
    assert ("<no-think>" in text) is (options.get("enable_thinking") is False)
    assert '<call>get_weather{"city": "Paris"}</call>' in text and "[for call_1]" in text
    assert "None" not in text  # a null content is left out, not rendered


@pytest.mark.parametrize(
    "content", ["One, two,", "One, two, ", [{"type": "text", "text": "One, two,"}]]
)
def test_continue_final_message_cuts_where_transformers_cuts(
    tokenizers: tuple[FastTokenizer, Any], content: Any
) -> None:
    ours, hf = tokenizers
    chat = [PREFILL_CHAT[0], {"role": "assistant", "content": content}]
    text = ours.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    assert text == hf.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    assert text.rstrip().endswith("One, two,")  # open: no end-of-turn after the prefill
    assert ours.apply_chat_template(chat, continue_final_message=True) == list(
        hf.apply_chat_template(chat, continue_final_message=True)["input_ids"]
    )


def test_continue_final_message_refuses_what_transformers_refuses(
    tokenizers: tuple[FastTokenizer, Any],
) -> None:
    ours, hf = tokenizers
    for tokenizer in (ours, hf):
        with pytest.raises(ValueError, match="not compatible"):
            tokenizer.apply_chat_template(
                PREFILL_CHAT,
                tokenize=False,
                continue_final_message=True,
                add_generation_prompt=True,
            )
    dropping = "{% for m in messages %}{{ m['role'] }}{% endfor %}"  # never shows the content
    for tokenizer in (ours, hf):
        with pytest.raises(ValueError, match="continue_final_message"):
            tokenizer.apply_chat_template(
                PREFILL_CHAT, tokenize=False, continue_final_message=True, chat_template=dropping
            )
