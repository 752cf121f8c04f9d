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
