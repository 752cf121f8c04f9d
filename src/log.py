"""One log format for every shardline process: the engine (CLI, server), workers, node agents.

    12:01:02.345 INFO  engine    shardline.engine: engine ready: ...
    12:01:02.101 INFO  worker 0  shardline.worker: [rank 0] weights ready in 0.43 s
    12:01:02.400 INFO  http      uvicorn.error: Uvicorn running on http://127.0.0.1:8000

`configure(level, role)` sets the root logger of a process shardline owns (the `shardline`
command, a worker, an agent); an application that embeds the engine keeps its own logging,
and its workers follow the level its `shardline` logger has (`worker_level`). The level
travels to the workers in `SHARDLINE_LOG_LEVEL`, so `-v` reaches them.
"""

from __future__ import annotations

import logging
import os
import sys

ENV = "SHARDLINE_LOG_LEVEL"
FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-5s %(role)-9s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"


class _RoleFilter(logging.Filter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        return True


def level_from_env(default: str = "INFO") -> int:
    """The level `SHARDLINE_LOG_LEVEL` names (a name or a number), else `default`."""
    value = os.environ.get(ENV, default).strip().upper()
    if value.isdigit():
        return int(value)
    level = logging.getLevelName(value)
    return level if isinstance(level, int) else logging.INFO


def configure(level: int | str, role: str) -> None:
    """Send this process's records to stderr in shardline's format, at `level`; workers this
    process starts inherit the level."""
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        level = level if isinstance(level, int) else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    handler.addFilter(_RoleFilter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    os.environ[ENV] = logging.getLevelName(level)


def worker_level() -> str:
    """The level for the workers this process starts: `SHARDLINE_LOG_LEVEL` when set, else
    what the `shardline` logger lets through here (an embedding application's choice)."""
    if ENV in os.environ:
        return logging.getLevelName(level_from_env())
    return logging.getLevelName(logging.getLogger("shardline").getEffectiveLevel())
