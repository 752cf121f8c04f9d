"""Text prompts get the special tokens their tokenizer defines (as vLLM tokenizes them); chat
prompts get only the ones their template writes.

A tiny model whose tokenizer adds a BOS to every text it encodes (a TemplateProcessing
post-processor, as Llama 3's tokenizer.json has) and whose chat template starts with that BOS:
a text prompt starts with one BOS, a chat prompt also with exactly one. SmolLM2's tokenizer
defines none, so its text prompts are the text's tokens alone.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest

from shardline.engine import LLM, Engine, EngineConfig, SamplingParams
from shardline.engine.server.sampling import count_prompt_tokens
from support.tiny_models import CHAT_TEMPLATE, make_tiny_model_dir

BOS = "<s>"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
PARAMS = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, int]:
    """The tiny model with a tokenizer that adds BOS (add_bos_token true); returns (dir, BOS id)."""
    from tokenizers import Tokenizer, processors

    path = make_tiny_model_dir(tmp_path_factory.mktemp("bos-model"), arch="LlamaForCausalLM")
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.add_special_tokens([BOS])
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer.save(str(path / "tokenizer.json"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(bos_token=BOS, add_bos_token=True, chat_template="{{ bos_token }}" + CHAT_TEMPLATE)
    config["added_tokens_decoder"][str(bos_id)] = {
        "content": BOS, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
        "single_word": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path, bos_id


def _cfg(path: pathlib.Path) -> EngineConfig:
    return EngineConfig(model=str(path), transport="inproc", max_model_len=128, num_kv_blocks=64, block_size=4)


async def _prompt_len(outputs: Any) -> int:
    num_prompt = -1
    async for out in outputs:
        num_prompt = out.num_prompt_tokens
        assert out.num_output_tokens <= 3
    return num_prompt


async def test_text_prompt_gets_bos_and_chat_gets_one(bos_model: tuple[pathlib.Path, int]) -> None:
    path, bos_id = bos_model
    async with await Engine.start(_cfg(path)) as engine:
        text_ids = engine._tokenize("hello world")
        assert text_ids == [bos_id, *b"hello world"]  # byte-level tokens after the BOS
        chat_ids = engine._chat_token_ids(MESSAGES)
        assert chat_ids[0] == bos_id and chat_ids.count(bos_id) == 1
        assert chat_ids == engine.tokenizer.encode(
            engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )
        # What the requests actually carried.
        assert await _prompt_len(engine.generate("hello world", PARAMS)) == len(text_ids)
        assert await _prompt_len(engine.chat(MESSAGES, PARAMS)) == len(chat_ids)
        # Token-id prompts are taken as they are.
        assert await _prompt_len(engine.generate([5, 6, 7], PARAMS)) == 3
        # The HTTP server's prompt count (its default max_tokens) agrees with the engine.
        assert count_prompt_tokens(engine.tokenizer, "hello world", chat=False) == len(text_ids)
        assert count_prompt_tokens(engine.tokenizer, MESSAGES, chat=True) == len(chat_ids)


def test_llm_text_and_chat_prompts(bos_model: tuple[pathlib.Path, int]) -> None:
    path, _ = bos_model
    with LLM(_cfg(path)) as llm:
        [text] = llm.generate(["hello world"], PARAMS, use_tqdm=False)
        [chat] = llm.chat([MESSAGES], PARAMS, use_tqdm=False)
        assert text.num_prompt_tokens == len(llm.engine._tokenize("hello world")) == 12
        assert chat.num_prompt_tokens == len(llm.engine._chat_token_ids(MESSAGES))


def test_smollm2_text_prompts_get_no_special_tokens(smollm2_dir: pathlib.Path) -> None:
    """SmolLM2's tokenizer defines no BOS to add: the tokenizer's default is the bare text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    text = "Why is the sky blue?"
    assert tokenizer.encode(text) == tokenizer.encode(text, add_special_tokens=False)
