"""Helpers for two-node tests: where node 1 lives and how its agents are started."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys


@dataclasses.dataclass
class Topology:
    """Where the head listens and how to start a process on node 1."""

    mode: str  # "netns" or "loopback"
    head_host: str
    prefix: list[str]  # command prefix that runs a program on node 1
    head_ifname: str | None = None  # gloo must use the link between the nodes
    node_ifname: str | None = None
    why_not_netns: str = ""

    def free_port(self) -> int:
        with socket.socket() as sock:
            sock.bind((self.head_host, 0))
            return int(sock.getsockname()[1])


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def netns_unavailable() -> str:
    if shutil.which("ip") is None:
        return "the `ip` command is not installed"
    if os.geteuid() != 0:
        return "not root, so no network namespaces"
    return ""


class Agents:
    """Node agents started as subprocesses; every one is stopped at the end of the test."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, head: str, token: str, node_rank: int, *extra: str) -> subprocess.Popen[str]:
        env = dict(os.environ, SHARDLINE_LOG_LEVEL="INFO")
        if self.topology.node_ifname:
            env["GLOO_SOCKET_IFNAME"] = self.topology.node_ifname
        cmd = [
            *self.topology.prefix,
            sys.executable,
            "-m",
            "engine.remote",
            "--head",
            head,
            "--token",
            token,
            "--node-rank",
            str(node_rank),
            "--nproc",
            "1",
            *extra,
        ]
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()  # the agent kills its ranks on SIGTERM
        for proc in self.procs:
            try:
                proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate(timeout=15)
