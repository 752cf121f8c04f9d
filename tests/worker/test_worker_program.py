"""Worker ranks run as their own program (`python -m shardline.worker`, config on stdin), so the
caller's `__main__` is never re-imported: a script without a main guard, `python -c`, code
piped to `python -`, and a start-up error that reaches the caller with the worker's own text.

Every engine here uses real worker processes (`transport="shm"`); each test checks that no
worker process and no shared-memory name of the engine's process outlives it.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import anyio
import psutil
import pytest

from shardline.engine import Engine, EngineConfig, EngineDeadError, SamplingParams
from shardline.worker.launch import describe_exit, launch_worker, reap_workers
from support.leaks import leaked_shm_entries, our_shm_entries, owner_pid

PARAMS = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
WORKER_CMD_TAIL = ["-m", "shardline.worker"]

# No `if __name__ == "__main__":` guard, on purpose. It prints its worker pids, their command
# lines and the tokens, or the error Engine.start raised; and the children still running once
# the engine is closed (none expected).
ENGINE_CODE = textwrap.dedent(
    """
    import asyncio, json, os, sys
    import psutil
    from shardline import Engine, EngineConfig, SamplingParams

    def report(**fields):
        live = [c.pid for c in psutil.Process().children(recursive=True)
                if c.status() != psutil.STATUS_ZOMBIE]
        print("RESULT " + json.dumps({"pid": os.getpid(), "children": live, **fields}), flush=True)

    async def main(path, **kw):
        cfg = EngineConfig(model=path, transport="shm", max_model_len=64, num_kv_blocks=16,
                           block_size=4, **kw)
        try:
            engine = await Engine.start(cfg)
        except Exception as exc:
            report(error=f"{type(exc).__name__}: {exc}")
            return
        async with engine:
            pids = [p for core in engine._cores for p in core.executor.worker_pids]
            cmdlines = [psutil.Process(p).cmdline() for p in pids]
            async for out in engine.generate("hello", SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)):
                pass
        report(workers=pids, cmdlines=cmdlines, tokens=out.token_ids)

    kw = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    asyncio.run(main(sys.argv[1], **kw))
    """
)

BROKEN_PLUGIN = textwrap.dedent(
    """
    from shardline.model.registry import ModelRegistry

    def broken_factory(model_config, parallel_context):
        raise RuntimeError(f"the broken factory refuses rank {parallel_context.get_tensor_parallel_rank()}")

    def register():
        ModelRegistry.register_model("BrokenLlama", broken_factory)
    """
)


@pytest.fixture(scope="module")
def reference_tokens(tiny_llama_dir: pathlib.Path) -> list[int]:
    """The same generation in this process, with the worker as a thread."""

    async def run() -> list[int]:
        cfg = EngineConfig(model=str(tiny_llama_dir), transport="inproc", max_model_len=64,
                           num_kv_blocks=16, block_size=4)  # fmt: skip
        tokens: list[int] = []
        async with await Engine.start(cfg) as engine:
            async for out in engine.generate("hello", PARAMS):
                tokens = list(out.token_ids)
        return tokens

    return anyio.run(run)


def _run_engine_program(
    argv: list[str],
    cwd: pathlib.Path,
    *,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, *argv], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=240,
        env=env,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    result: dict[str, object] = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["children"] == [], result
    _assert_nothing_left(int(result["pid"]), [int(p) for p in result.get("workers", [])])  # type: ignore[arg-type, union-attr]
    return result


def _assert_nothing_left(engine_pid: int, worker_pids: list[int]) -> None:
    """The engine's process exited: its workers are gone (or zombies awaiting a reaper), and
    no shared-memory name it created is left."""
    deadline = time.monotonic() + 10
    while True:
        alive = [p for p in worker_pids if _running(p)]
        shm = [n for n in our_shm_entries() if owner_pid(n) == engine_pid]
        if not alive and not shm:
            return
        assert time.monotonic() < deadline, f"left behind: workers {alive}, shm {shm}"
        time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _check_generation(result: dict[str, object], expected: list[int]) -> None:
    assert result["tokens"] == expected
    assert len(result["workers"]) == 1  # type: ignore[arg-type]
    for cmdline in result["cmdlines"]:  # type: ignore[union-attr]
        assert cmdline[-2:] == WORKER_CMD_TAIL, cmdline


def test_script_without_main_guard(
    tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path, reference_tokens: list[int]
) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(ENGINE_CODE)
    result = _run_engine_program([str(script), str(tiny_llama_dir)], tmp_path)
    _check_generation(result, reference_tokens)


def test_python_dash_c(
    tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path, reference_tokens: list[int]
) -> None:
    result = _run_engine_program(["-c", ENGINE_CODE, str(tiny_llama_dir)], tmp_path)
    _check_generation(result, reference_tokens)


def test_code_piped_to_python_stdin(
    tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path, reference_tokens: list[int]
) -> None:
    result = _run_engine_program(["-", str(tiny_llama_dir)], tmp_path, stdin=ENGINE_CODE)
    _check_generation(result, reference_tokens)


def test_factory_error_reaches_the_caller_from_a_script(
    tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """The plugin lives in a folder only PYTHONPATH names; the worker imports it and its
    factory raises while loading: the caller reads the factory's message, not "process exited"."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "broken_plugin.py").write_text(BROKEN_PLUGIN)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(plugins), os.environ.get("PYTHONPATH")])),
    )
    kw = json.dumps({"plugins": ["broken_plugin:register"], "model_arch": "BrokenLlama"})
    result = _run_engine_program(["-c", ENGINE_CODE, str(tiny_llama_dir), kw], tmp_path, env=env)
    error = str(result["error"])
    assert "the broken factory refuses rank 0" in error, error
    assert "process exited" not in error, error


async def test_factory_error_reaches_the_caller_from_every_rank(
    tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ranks whose factory raises (one may exit before the other's report is read): the
    error is a rank's own message, found in this process's sys.path only (the launcher's
    sys.path goes to the workers)."""
    (tmp_path / "broken_plugin_tp.py").write_text(BROKEN_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    shm_before = set(our_shm_entries())
    cfg = EngineConfig(model=str(tiny_llama_dir), transport="shm", tensor_parallel_size=2,
                       max_model_len=64, num_kv_blocks=16, block_size=4, model_arch="BrokenLlama",
                       plugins=("broken_plugin_tp:register",))  # fmt: skip
    with anyio.fail_after(120), pytest.raises(EngineDeadError) as info:
        await Engine.start(cfg)
    assert "the broken factory refuses rank" in str(info.value), str(info.value)
    assert leaked_shm_entries(shm_before) == []
    assert not [c for c in psutil.Process().children(recursive=True) if _running(c.pid)
                and c.cmdline()[-2:] == WORKER_CMD_TAIL]  # fmt: skip


async def test_a_killed_worker_is_named_by_its_signal_at_once(tiny_llama_dir: pathlib.Path) -> None:
    shm_before = set(our_shm_entries())
    cfg = EngineConfig(model=str(tiny_llama_dir), transport="shm", max_model_len=64, num_kv_blocks=16,
                       block_size=4, max_worker_restarts=0)  # fmt: skip
    async with await Engine.start(cfg) as engine:
        executor = engine._cores[0].executor
        (pid,) = executor.worker_pids
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        with anyio.fail_after(5):
            await executor.wait_failed()
        assert time.monotonic() - killed_at < 1.0
        assert executor.failure is not None
        assert str(executor.failure) == "worker rank 0 failed: killed by SIGKILL"
    assert not _running(pid)
    assert leaked_shm_entries(shm_before) == []


def test_the_program_refuses_to_run_without_a_config(tmp_path: pathlib.Path) -> None:
    proc = subprocess.run([sys.executable, *WORKER_CMD_TAIL], stdin=subprocess.DEVNULL, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert "no worker config on stdin" in proc.stderr


def test_a_bad_config_exits_with_status_2_and_is_reaped(tmp_path: pathlib.Path) -> None:
    process = launch_worker({"rank": 0, "world_size": 1, "no_such_key": 1})
    try:
        assert process.wait(60) == 2
        assert not process.is_alive() and process.exitcode == 2
        assert describe_exit(process.returncode) == "process exited with status 2"
    finally:
        reap_workers([process], 0.0)
    assert not _running(process.pid)


def test_reap_kills_a_worker_that_does_not_exit() -> None:
    process = launch_worker({"rank": 0})
    os.kill(process.pid, signal.SIGSTOP)  # hung: not even SIGTERM ends it
    started = time.monotonic()
    reap_workers([process], 0.2)
    assert time.monotonic() - started < 5.0
    assert process.returncode == -signal.SIGKILL
    assert describe_exit(process.returncode) == "killed by SIGKILL"
    assert not _running(process.pid)


def test_the_launcher_module_does_not_import_torch() -> None:
    code = "import sys, shardline.worker.launch; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


class _FakePopen:
    """Stands in for a worker's Popen: a pid and a settable exit status."""

    def __init__(self, pid: int, returncode: int | None = None) -> None:
        self.pid, self.returncode = pid, returncode

    def poll(self) -> int | None:
        return self.returncode


async def test_an_exit_with_an_error_status_waits_briefly_for_the_workers_own_report(
    tiny_llama_dir: pathlib.Path,
) -> None:
    """The executor's judgement, with stand-in processes: a signal is named at once; an error
    status waits up to the grace for the rank's WorkerError (its text wins), then names the
    status; a survivor's collective error never hides the rank that died."""
    from shardline.engine.executor import _EXIT_GRACE, Executor
    from shardline.transport.messages import WorkerError
    from shardline.worker.launch import WorkerProcess

    def executor_with(rank0: int | None) -> tuple[Executor, _FakePopen]:
        executor = Executor(
            EngineConfig(model=str(tiny_llama_dir), tensor_parallel_size=2), str(tiny_llama_dir)
        )
        popen = _FakePopen(101, rank0)
        executor._handles = {0: WorkerProcess(popen, 0), 1: WorkerProcess(_FakePopen(102), 1)}  # type: ignore[arg-type]
        return executor, popen

    executor, _ = executor_with(-signal.SIGKILL)
    assert executor._dead_cause(100.0) == (0, "killed by SIGKILL")

    executor, _ = executor_with(1)
    assert executor._dead_cause(100.0) is None
    assert executor._dead_cause(100.0 + _EXIT_GRACE) == (0, "process exited with status 1")

    executor, _ = executor_with(1)
    assert executor._dead_cause(time.monotonic()) is None
    # The survivor's error about its dead peer comes first: no verdict yet ...
    executor._on_message(
        1, WorkerError(rank=1, kind="RuntimeError", message="gloo: connection reset", traceback="")
    )
    assert executor.failure is None
    # ... then the dead rank's own report, read within the grace: its text is the failure.
    executor._on_message(
        0, WorkerError(rank=0, kind="ValueError", message="bad shard", traceback="")
    )
    assert str(executor.failure) == "worker rank 0 failed: ValueError: bad shard"

    executor, popen = executor_with(None)
    executor._on_message(
        0, WorkerError(rank=0, kind="ValueError", message="bad shard", traceback="")
    )
    assert str(executor.failure) == "worker rank 0 failed: ValueError: bad shard"
    popen.returncode = 1  # exits after reporting: the report stays the reason
    assert executor._dead_cause(100.0) == (0, "ValueError: bad shard")
