"""Start one worker rank as its own program: `python -m shardline.worker`, config on stdin.

Both the engine's executor (the ranks of this machine) and the node agent (`shardline
worker`, the ranks of another machine) start ranks through `launch_worker`. The rank runs
`sys.executable -m shardline.worker` (never the caller's `__main__`, so a script without an
``if __name__ == "__main__"`` guard, ``python -c``, code piped to ``python -`` and notebooks
all work) and reads what it needs from its stdin, which the launcher writes and closes::

    msgpack map {"config": WorkerConfig.to_dict(), "sys_path": the launcher's sys.path}

The config may hold a TCP token, so it never goes through argv or the environment. The
launcher's `sys.path` lets the rank import what the launcher's process could (a plugin or a
registered model factory next to the user's script, or on a path the user added). The rank's
stdout and stderr are the launcher's, so its logs go where the engine's go.

This module imports no torch (the engine's process and the agent import it to launch).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Mapping
from typing import IO, Any

import msgpack

WORKER_MODULE = "shardline.worker"
MAX_PAYLOAD_BYTES = 64 << 20  # a config is a few KB; anything near this is not one


class WorkerProcess:
    """A running worker program: a small handle over its `subprocess.Popen`."""

    def __init__(self, popen: subprocess.Popen[bytes], rank: int | None = None) -> None:
        self._popen = popen
        self.rank = rank

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """None while running; the exit status, or -N when signal N ended it."""
        return self._popen.poll()

    exitcode = returncode  # multiprocessing's name for it

    def is_alive(self) -> bool:
        return self.returncode is None

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status once it exited, or None if it still runs after `timeout` seconds."""
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def terminate(self) -> None:
        """SIGTERM (nothing if it already exited)."""
        with contextlib.suppress(ProcessLookupError):
            self._popen.terminate()

    def kill(self) -> None:
        """SIGKILL (nothing if it already exited)."""
        with contextlib.suppress(ProcessLookupError):
            self._popen.kill()

    def __repr__(self) -> str:
        return f"WorkerProcess(rank={self.rank}, pid={self.pid}, returncode={self.returncode})"


_launched: weakref.WeakSet[WorkerProcess] = weakref.WeakSet()


def worker_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a worker starts with: `base` (default: ours) plus OMP_WAIT_POLICY=PASSIVE
    unless a wait policy or spin count is set there (its OpenMP runtime reads it at load), and
    SHARDLINE_LOG_LEVEL.

    OpenMP's default spin-waiting makes torch's intra-op threads burn the cores they share
    with the engine's own process and other workers; on a busy 2-core machine a 32-row GEMM
    measured 15x slower with 2 spinning threads than with 1. PASSIVE waiters sleep instead.
    A bounded spin (e.g. `OMP_WAIT_POLICY=ACTIVE GOMP_SPINCOUNT=20000`) measured 21% faster on
    an idle 2-core machine but 37% slower with one core busy (benchmarks/RESULTS.md section 1),
    so it is the user's choice: a wait policy or spin count the user set wins.
    """
    from shardline import log

    env = dict(os.environ if base is None else base)
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    # The rank logs at this process's level (`-v` reaches it; an embedding application's
    # level for its `shardline` logger does too).
    env.setdefault(log.ENV, log.worker_level())
    return env


def launch_worker(
    config: Mapping[str, Any], *, env: Mapping[str, str] | None = None
) -> WorkerProcess:
    """Start `python -m shardline.worker` for one rank (`config`: a `WorkerConfig.to_dict()`).

    `env` is the rank's whole environment (default: this process's), with the OpenMP default
    of `worker_environment` added. Returns at once; the rank reports Hello on its channels.
    """
    payload = msgpack.packb({"config": dict(config), "sys_path": list(sys.path)}, use_bin_type=True)
    flags: list[str] = getattr(subprocess, "_args_from_interpreter_flags", list)()  # -X, -W, -O...
    popen = subprocess.Popen(
        [sys.executable, *flags, "-m", WORKER_MODULE],
        stdin=subprocess.PIPE,
        env=worker_environment(env),
        close_fds=True,
    )
    assert popen.stdin is not None
    try:
        popen.stdin.write(payload)
    except BrokenPipeError:
        pass  # it died before reading: its exit status says so
    finally:
        with contextlib.suppress(BrokenPipeError):
            popen.stdin.close()
    rank = config.get("rank")
    process = WorkerProcess(popen, rank if isinstance(rank, int) else None)
    _launched.add(process)
    return process


def reap_workers(processes: list[WorkerProcess], grace: float) -> None:
    """Wait up to `grace` seconds for every process to exit, then SIGTERM, then SIGKILL
    (2 s each); blocking. Every process is waited for, so none is left a zombie."""
    deadline = time.monotonic() + grace
    for process in processes:
        process.wait(max(0.0, deadline - time.monotonic()))
    for stop in (WorkerProcess.terminate, WorkerProcess.kill):
        live = [p for p in processes if p.is_alive()]
        if not live:
            return
        for process in live:
            stop(process)
        for process in live:
            process.wait(2.0)


def describe_exit(returncode: int | None) -> str:
    """A worker's end in words: "killed by SIGKILL", "process exited with status 1"."""
    if returncode is None:
        return "process exited"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"process exited with status {returncode}"


def read_launch_payload(stream: IO[bytes]) -> dict[str, Any]:
    """The worker's side: read the launcher's map from `stream` up to EOF; put its sys.path
    entries first on ours. Returns the WorkerConfig dict. Raises ValueError if it is not one."""
    data = stream.read(MAX_PAYLOAD_BYTES + 1)
    if not data:
        raise ValueError(
            "no worker config on stdin; this program is started by shardline's launcher "
            "(shardline.worker.launch.launch_worker), not by hand"
        )
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"worker config on stdin is larger than {MAX_PAYLOAD_BYTES} bytes")
    try:
        payload = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:
        raise ValueError(f"worker config on stdin is not msgpack: {exc}") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict):
        raise ValueError("worker config on stdin is not a {'config': {...}} map")
    launcher_path = [p for p in payload.get("sys_path", []) if isinstance(p, str)]
    sys.path[:] = launcher_path + [p for p in sys.path if p not in launcher_path]
    config: dict[str, Any] = payload["config"]
    return config


@atexit.register
def _stop_orphans() -> None:
    """Like multiprocessing's daemon children: ranks still running when the launching
    interpreter exits are stopped (they would notice the launcher's death by themselves too,
    within a few seconds)."""
    live = [p for p in list(_launched) if p.is_alive()]
    if live:
        reap_workers(live, grace=0.0)
