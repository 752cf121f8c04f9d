"""Two "nodes" on one machine: a network namespace with its own address when we may create
one (root + `ip`), else a second process group on loopback. Agents are real subprocesses."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest

from multinode.nodes import Agents, Topology, ip, netns_unavailable


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    """Node 1 in its own namespace (10.213.N.2, head at 10.213.N.1 on a veth pair), else loopback."""
    reason = netns_unavailable()
    tag = secrets.token_hex(3)
    ns, host_if, node_if = f"shardline_{tag}", f"shlh{tag}", f"shln{tag}"
    subnet = int(tag[:2], 16)
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
            # Stated, not silent: the run falls back to two process groups on loopback.
            print(f"multinode: using loopback ({reason})", file=sys.stderr)
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


@pytest.fixture
def agents(topology: Topology, monkeypatch: pytest.MonkeyPatch) -> Iterator[Agents]:
    """Starts agents on node 1; the head's own ranks use the inter-node link for gloo too."""
    if topology.head_ifname:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", topology.head_ifname)
    group = Agents(topology)
    try:
        yield group
    finally:
        group.stop()
