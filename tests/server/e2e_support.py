"""The real `shardline serve` process on the default model, and `Engine` references for it."""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import pytest

from server.process import ServerProcess, server_process

MAX_MODEL_LEN = 512  # room for a request that is still running seconds after it started
MAX_TOKENS = 10
SERVE_ARGS = ["serve", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8"]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a color."}],
]


def shardline_executable() -> str:
    """The installed console script next to this interpreter."""
    path = pathlib.Path(sys.executable).parent / "shardline"
    if not path.exists():
        pytest.fail(f"console script {path} missing: install the project (pip install -e .)")
    return str(path)


@dataclass
class References:
    """What `Engine.generate` / `Engine.chat` return for the tests' greedy requests."""

    completions: dict[str, tuple[str, int]]  # prompt -> (text, completion tokens)
    chats: list[tuple[str, int]]
    token_ids: dict[str, list[int]]  # prompt -> the greedy completion's token ids


def engine_references() -> References:
    """Greedy outputs from an in-process Engine with the server's configuration."""
    from shardline.engine import Engine, EngineConfig, SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)

    async def run() -> References:
        config = EngineConfig(max_model_len=MAX_MODEL_LEN, max_num_seqs=8)
        completions: dict[str, tuple[str, int]] = {}
        chats: list[tuple[str, int]] = []
        token_ids: dict[str, list[int]] = {}
        async with await Engine.start(config) as engine:
            for prompt in PROMPTS:
                async for out in engine.generate(prompt, params):
                    if out.finished:
                        completions[prompt] = (out.text, out.num_output_tokens)
                        token_ids[prompt] = list(out.token_ids)
            for messages in CHATS:
                async for out in engine.chat(messages, params):
                    if out.finished:
                        chats.append((out.text, out.num_output_tokens))
        return References(completions, chats, token_ids)

    return anyio.run(run)


@pytest.fixture(scope="session")
def references() -> References:
    return engine_references()


@pytest.fixture(scope="session")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`shardline serve` on the default model, shared by the slow end-to-end tests."""
    with server_process([shardline_executable(), *SERVE_ARGS], tmp_path_factory.mktemp("serve")) as server:
        server.wait_healthy(900)
        yield server
        assert server.stop() == 0, server.log()
