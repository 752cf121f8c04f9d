"""What a test run may leave behind: our shared-memory names and child processes."""

from __future__ import annotations

import os

import psutil

SHM_PREFIX = "shardline_"


def our_shm_entries() -> list[str]:
    """Names in /dev/shm that belong to this library (segments and semaphores)."""
    try:
        names = os.listdir("/dev/shm")
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(SHM_PREFIX) or n.startswith("sem." + SHM_PREFIX))


def owner_pid(name: str) -> int | None:
    """The creator pid embedded in one of our names (`[sem.]shardline_<pid>_...`)."""
    parts = name.removeprefix("sem.").split("_")
    try:
        return int(parts[1])
    except (IndexError, ValueError):
        return None


def leaked_shm_entries(before: set[str]) -> list[str]:
    """Names that appeared since `before` and belong to this process or to a dead one.

    Names of other live processes (another test session running beside this one) are theirs
    to clean up and are not counted.
    """
    me = os.getpid()
    leaked = []
    for name in set(our_shm_entries()) - before:
        pid = owner_pid(name)
        if pid is None or pid == me or not psutil.pid_exists(pid):
            leaked.append(name)
    return sorted(leaked)


def live_children() -> list[psutil.Process]:
    """Child processes of this process that are still running (zombies excluded)."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out
