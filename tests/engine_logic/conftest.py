"""Fixtures shared by the structured-output tests: SmolLM2's tokenizer and a grammar compiler
over it (EOS 2, SmolLM2-Instruct's <|im_end|>)."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

from shardline.engine.structured_output import GrammarCompiler


@pytest.fixture(scope="module")
def compiler(smollm2_dir: pathlib.Path) -> GrammarCompiler:
    return GrammarCompiler((smollm2_dir / "tokenizer.json").read_text(), eos_token_ids=[2])


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: pathlib.Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
