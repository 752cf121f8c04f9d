"""Fixtures for the model tests: the converted SmolLM2, tiny checkpoints, spawned TP workers."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
TESTS_DIR = HERE.parent


@pytest.fixture
def two_threads() -> Any:
    """The CPU kernels' pool splits work only with more than one torch thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def worker_module() -> ModuleType:
    """tests/model/dist_worker.py, imported by path (it is not on sys.path)."""
    spec = importlib.util.spec_from_file_location("shardline_test_dist_worker", HERE / "dist_worker.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def run_tp(tmp_path: pathlib.Path) -> Callable[..., dict[tuple[str, int], Any]]:
    """Run dist_worker.py in `world_size` processes; returns {(job, rank): saved result}."""
    procs: list[subprocess.Popen[bytes]] = []

    def run(world_size: int, jobs: list[dict[str, Any]], registry: dict[str, str] | None = None,
            env: dict[str, str] | None = None, timeout: float = 240,
            enable_expert_parallel: bool = False) -> dict[tuple[str, int], Any]:
        out_dir = tmp_path / f"tp{world_size}-{len(procs)}"
        out_dir.mkdir()
        spec = {"world_size": world_size, "tp_size": world_size, "jobs": jobs,
                "init_method": f"tcp://127.0.0.1:{free_port()}", "out_dir": str(out_dir),
                "registry": registry or {}, "enable_expert_parallel": enable_expert_parallel}
        spec_path = out_dir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        child_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH")) if p)
        logs = [open(out_dir / f"rank{r}.log", "wb") for r in range(world_size)]  # noqa: SIM115
        batch = [subprocess.Popen([sys.executable, str(HERE / "dist_worker.py"), str(spec_path), str(r)],
                                  env=child_env, stdout=logs[r], stderr=subprocess.STDOUT)
                 for r in range(world_size)]
        procs.extend(batch)
        deadline = time.monotonic() + timeout
        try:
            for proc in batch:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            for log in logs:
                log.close()
        failed = [(r, p.returncode) for r, p in enumerate(batch) if p.returncode != 0]
        if failed:
            for proc in batch:
                if proc.poll() is None:
                    proc.kill()
            output = "\n".join(f"--- rank {r} ---\n" + (out_dir / f"rank{r}.log").read_text()[-3000:]
                               for r in range(world_size))
            raise AssertionError(f"TP workers failed (rank, exit code): {failed}\n{output}")
        return {(job["name"], r): torch.load(out_dir / f"{job['name']}-rank{r}.pt")
                for job in jobs for r in range(world_size)}

    yield run
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()

