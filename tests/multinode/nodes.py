"""Helpers for two-node tests: where node 1 lives and how its agents are started."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence


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


def _unused_subnet() -> int:
    """N such that no interface here has an address in 10.213.N.0/24."""
    taken = subprocess.run(
        ["ip", "-4", "-o", "addr"], capture_output=True, text=True, timeout=30
    ).stdout
    free = [n for n in range(1, 255) if f"10.213.{n}." not in taken]
    return secrets.choice(free)


def netns_unavailable() -> str:
    if shutil.which("ip") is None:
        return "the `ip` command is not installed"
    if os.geteuid() != 0:
        return "not root, so no network namespaces"
    return ""


@contextlib.contextmanager
def two_nodes(mode: str) -> Iterator[Topology]:
    """Node 1 in its own namespace (10.213.N.2; the head is 10.213.N.1 on a veth pair) for
    mode "netns" where we may create one, else (or for mode "loopback") on loopback."""
    reason = netns_unavailable() if mode == "netns" else "loopback requested"
    tag = secrets.token_hex(3)
    ns, host_if, node_if = f"shardline_{tag}", f"shlh{tag}", f"shln{tag}"
    subnet = _unused_subnet() if not reason else 0
    created = False
    if not reason:
        try:
            ip("netns", "add", ns)
            created = True
            ip("link", "add", host_if, "type", "veth", "peer", "name", node_if)
            ip("link", "set", node_if, "netns", ns)
            ip("addr", "add", f"10.213.{subnet}.1/24", "dev", host_if)
            ip("link", "set", host_if, "up")
            ip("-n", ns, "addr", "add", f"10.213.{subnet}.2/24", "dev", node_if)
            ip("-n", ns, "link", "set", node_if, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        except (subprocess.CalledProcessError, OSError) as exc:
            reason = f"cannot set up a namespace: {getattr(exc, 'stderr', '') or exc}"
    try:
        if reason:
            # Stated, not silent: two process groups on loopback instead.
            print(f"multinode: node 1 on loopback ({reason})", file=sys.stderr)
            yield Topology("loopback", "127.0.0.1", [], why_not_netns=reason)
        else:
            yield Topology(
                "netns",
                f"10.213.{subnet}.1",
                ["ip", "netns", "exec", ns],
                head_ifname=host_if,
                node_ifname=node_if,
            )
    finally:
        if created:
            subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=30)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


class Agents:
    """Node agents started as subprocesses (output to a file, so a full pipe never blocks
    one); every one is stopped at the end of the test."""

    def __init__(self, topology: Topology, log_dir: pathlib.Path) -> None:
        self.topology = topology
        self.log_dir = log_dir
        self.procs: dict[subprocess.Popen[bytes], pathlib.Path] = {}

    def start(
        self,
        head: str,
        token: str,
        node_rank: int,
        env: dict[str, str] | None = None,
        *,
        token_via: str = "env",
        extra: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        """`agent_main` (what `shardline worker` runs) on node 1; `env` is added to ours.
        The token goes through $SHARDLINE_TOKEN (`token_via` "env", the recommended way),
        a --token-file ("file") or --token ("flag"); `extra` are more agent arguments."""
        env = dict(os.environ, SHARDLINE_LOG_LEVEL="INFO", **(env or {}))
        env.pop("SHARDLINE_TOKEN", None)
        if self.topology.node_ifname:
            env["GLOO_SOCKET_IFNAME"] = self.topology.node_ifname
        main = "import sys; from shardline.engine.remote import agent_main; sys.exit(agent_main())"
        cmd = [*self.topology.prefix, sys.executable, "-c", main, "--head", head]
        cmd += ["--node-rank", str(node_rank), "--nproc", "1", *extra]
        if token_via == "env":
            env["SHARDLINE_TOKEN"] = token
        elif token_via == "file":
            token_file = self.log_dir / f"token-{len(self.procs)}"
            token_file.write_text(token + "\n")
            token_file.chmod(0o600)
            cmd += ["--token-file", str(token_file)]
        else:
            cmd += ["--token", token]
        log = self.log_dir / f"agent-{len(self.procs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs[proc] = log
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        """What the agent (and its ranks) printed so far."""
        return self.procs[proc].read_text(errors="replace")

    def wait(self, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> str:
        """Wait for the agent to exit by itself; its output."""
        proc.wait(timeout)
        return self.log(proc)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()  # the agent kills its ranks on SIGTERM
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)
