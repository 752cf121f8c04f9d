"""Running `shardline serve` (real or with the fake engine) as a child process in tests."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import httpx

HERE = pathlib.Path(__file__).resolve().parent


def free_port() -> int:
    """A port nobody listens on right now (the server binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A server child process, its base URL and its log."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: pathlib.Path) -> None:
        self.proc = proc
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, deadline_s: float) -> None:
        """Poll /health until 200; fail with the log if the process exits or time runs out."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not healthy after {deadline_s} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, deadline_s: float = 60) -> int:
        """Send `sig` and wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=deadline_s)


@contextmanager
def server_process(
    command: Sequence[str], tmp_path: pathlib.Path, *, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """Start `command + ["--port", PORT]`; always terminated (then killed) on the way out."""
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [*command, "--port", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    server = ServerProcess(proc, port, log_path)
    try:
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def fake_serve_command(*args: str) -> list[str]:
    """`shardline serve` with the fake engine (see fake_serve.py)."""
    return [sys.executable, str(HERE / "fake_serve.py"), *args]
