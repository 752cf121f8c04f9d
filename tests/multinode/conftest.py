"""Two "nodes" on one machine: a network namespace with its own address when we may create
one (root + `ip`), else a second process group on loopback. Agents are real subprocesses."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from multinode.nodes import Agents, Topology, netns_unavailable, two_nodes


@pytest.fixture(scope="module", params=["netns", "loopback"])
def topology(request: pytest.FixtureRequest) -> Iterator[Topology]:
    """Each two-node test runs with node 1 in a network namespace and on loopback."""
    if request.param == "netns" and (reason := netns_unavailable()):
        pytest.skip(f"no network namespace ({reason}); the loopback variant runs the same test")
    with two_nodes(request.param) as topology:
        yield topology


@pytest.fixture(scope="module")
def preferred_topology() -> Iterator[Topology]:
    """A namespace where we may create one, else loopback (for the heavier tests, run once)."""
    with two_nodes("netns") as topology:
        yield topology


@pytest.fixture
def agents(
    topology: Topology, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> Iterator[Agents]:
    """Starts agents on node 1; the head's own ranks use the inter-node link for gloo too."""
    if topology.head_ifname:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", topology.head_ifname)
    group = Agents(topology, tmp_path)
    try:
        yield group
    finally:
        group.stop()
