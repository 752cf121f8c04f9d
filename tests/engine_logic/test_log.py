"""One log format everywhere, and the level reaches the workers."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from shardline import log
from shardline.worker.launch import worker_environment


def test_workers_get_the_level_the_embedding_application_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(log.ENV, raising=False)
    monkeypatch.setattr(logging.getLogger("shardline"), "level", logging.DEBUG)
    assert worker_environment({})[log.ENV] == "DEBUG"
    monkeypatch.setattr(logging.getLogger("shardline"), "level", logging.ERROR)
    assert worker_environment({})[log.ENV] == "ERROR"
    monkeypatch.setenv(log.ENV, "WARNING")  # set explicitly: it wins
    assert worker_environment({log.ENV: "WARNING"})[log.ENV] == "WARNING"


def test_configure_formats_every_process_alike_and_passes_the_level_on() -> None:
    code = ("import logging, os; from shardline import log; log.configure(logging.DEBUG, 'worker 3'); "
            "logging.getLogger('shardline.worker').debug('hello'); print(os.environ[log.ENV])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.strip() == "DEBUG"
    (line,) = proc.stderr.strip().splitlines()
    assert line.split()[1:] == ["DEBUG", "worker", "3", "shardline.worker:", "hello"], line


def test_the_level_is_read_by_name_or_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(log.ENV, "debug")
    assert log.level_from_env() == logging.DEBUG
    monkeypatch.setenv(log.ENV, "30")
    assert log.level_from_env() == logging.WARNING
    monkeypatch.setenv(log.ENV, "chatty")
    assert log.level_from_env() == logging.INFO
