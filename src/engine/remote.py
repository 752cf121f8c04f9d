"""Multi-node runs: the head's node server and the node agent (`shardline worker`).

Node 0 (the head) runs the Engine and its own ranks; every other node K runs::

    shardline worker --head HEAD_HOST:HEAD_PORT --token TOKEN --node-rank K [--nproc N]

Agent <-> head protocol, on one TCP connection to HEAD_HOST:HEAD_PORT::

    agent -> head   b"SHRDNODE" + node_rank (u32, big-endian)  in the clear, so that the head
                                                                can say which node failed auth
    both            the HMAC handshake of `transport.tcp` on the shared token
    agent -> head   Hello(rank=node_rank, world_size=nproc, pid)
    head  -> agent  InitWorker(config) per rank of that node (WorkerConfig dicts)
    agent -> head   Heartbeat(rank=node_rank, seq)                        every 0.5 s
    agent -> head   WorkerError(rank, "ProcessExited"|"ProcessKilled", ...)  a local rank died
    head  -> agent  Shutdown                                              stop the ranks, exit 0

The agent starts each rank as the program `python -m shardline.worker` through
`shardline.worker.launch.launch_worker` (as the head's executor does; the config goes to the
rank's stdin). The ranks themselves attach their channels to the head over authenticated TCP
(the address in their config) and join torch.distributed at the head's rendezvous store.
A rank killed by a signal fails the head's group at once; one that exited with an error status
is judged by the head's executor, which first gives the rank's own WorkerError (sent over its
channel just before it exits) a moment to arrive. A head that closes the connection without
Shutdown (its worker group failed and is being restarted) or that vanishes makes the agent
stop its ranks and reconnect, for a new generation of the group.
The claimed node rank is only trusted after authentication; a wrong token fails the head's
start at once (naming the node) instead of waiting for the start-up timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from shardline.transport import tcp
from shardline.transport.errors import AuthenticationError, TransportError
from shardline.transport.messages import (
    Heartbeat,
    Hello,
    InitWorker,
    Shutdown,
    WorkerError,
    decode,
    encode,
)
from shardline.worker.launch import WorkerProcess, describe_exit, launch_worker, reap_workers

log = logging.getLogger("shardline.remote")

NODE_MAGIC = b"SHRDNODE"
_PREFIX = len(NODE_MAGIC) + 4
AGENT_HEARTBEAT = 0.5
EXIT_OK, EXIT_UNREACHABLE, EXIT_AUTH = 0, 1, 3

FailFn = Callable[[int | None, str], None]


# ------------------------------------------------------------------------------ head side


class NodeServer:
    """The head's end: accepts node agents, hands out their ranks' configs, watches them."""

    def __init__(self, node_ranks: dict[int, list[int]], token: bytes, fail: FailFn) -> None:
        self.node_ranks = node_ranks  # node -> the global ranks it runs (node 0 excluded)
        self.token = token
        self._fail = fail
        self._sock: socket.socket | None = None
        self._links: dict[int, tcp.TcpTransport] = {}
        self._dead: dict[int, tuple[bool, str]] = {}  # rank -> (killed by a signal, how it ended)
        self._closing = False
        self.address = ""

    def listen(self, host: str, port: int) -> None:
        """Bind the agents' port (SO_REUSEADDR, so a restarted group can bind it again)."""
        try:
            self._sock = socket.create_server((host, port), backlog=64)
        except OSError as exc:
            raise OSError(f"cannot listen for node agents on {host}:{port}: {exc}") from exc
        self._sock.setblocking(False)
        self.address = f"{host}:{port}"

    def missing(self) -> list[int]:
        """Nodes whose agent has not connected (yet)."""
        return sorted(set(self.node_ranks) - set(self._links))

    def rank_alive(self, rank: int) -> bool:
        """False once the rank's agent reported it dead or the agent itself went away."""
        return rank not in self._dead

    def exit_reason(self, rank: int) -> tuple[bool, str]:
        """For a rank that is not alive: (killed by a signal, how it ended, naming its node)."""
        return self._dead.get(rank, (False, "process exited"))

    async def serve(self, configs: dict[int, list[dict[str, Any]]]) -> None:
        """Accept agents until every node has its ranks, then watch them (in tasks)."""
        assert self._sock is not None
        async with anyio.create_task_group() as tg:
            while self.missing() and not self._closing:
                try:
                    sock, peer = self._sock.accept()
                except (BlockingIOError, InterruptedError):
                    try:
                        await anyio.wait_readable(self._sock)
                    except (OSError, anyio.ClosedResourceError):
                        return  # closed by aclose
                    continue
                except OSError:
                    return
                tg.start_soon(self._admit, sock, peer[0], configs)
            with contextlib.suppress(OSError):  # every node is in: stop listening
                self._sock.close()

    async def _admit(
        self, sock: socket.socket, peer: str, configs: dict[int, list[dict[str, Any]]]
    ) -> None:
        try:
            admitted = await self._authenticate(sock, peer)
        except BaseException:  # cancelled mid-handshake (the head is going away): no fd leak
            sock.close()
            raise
        if admitted is None:
            return
        node, link = admitted
        log.info(
            "node %d agent connected from %s; sending ranks %s", node, peer, self.node_ranks[node]
        )
        try:
            for config in configs[node]:
                await link.send_frame(encode(InitWorker(config=config)))
        except TransportError as exc:
            self._lost(node, f"node {node}'s agent went away: {exc}")
            return
        await self._watch(node, link)

    async def _authenticate(
        self, sock: socket.socket, peer: str
    ) -> tuple[int, tcp.TcpTransport] | None:
        """Node announcement, HMAC handshake, Hello: the node and its link, or None (refused,
        logged; a wrong token or a node that does not fit fails the start, naming it)."""
        sock.setblocking(False)
        try:
            with anyio.fail_after(tcp.HANDSHAKE_TIMEOUT):
                prefix = await tcp.recv_exact(sock, _PREFIX, "closed before announcing its node")
        except (OSError, TimeoutError, ConnectionError) as exc:
            log.warning("node agent from %s: no node announcement (%s); dropped", peer, exc)
            sock.close()
            return None
        if not prefix.startswith(NODE_MAGIC):
            log.warning("a client from %s is not a shardline node agent; dropped", peer)
            sock.close()
            return None
        node = int.from_bytes(prefix[len(NODE_MAGIC) :], "big")
        if not await tcp.server_handshake(sock, self.token):
            sock.close()
            self._fail(None, f"node {node} (agent at {peer}) failed authentication: wrong --token?")
            return None
        link = tcp.TcpTransport(sock, max_message_size=tcp.DEFAULT_MAX_MESSAGE_SIZE)
        try:
            with anyio.fail_after(tcp.HANDSHAKE_TIMEOUT):
                hello = decode(await link.recv_frame())
            if not isinstance(hello, Hello) or hello.rank != node:
                raise TransportError(f"expected Hello(rank={node}), got {hello!r}")
        except (TransportError, TimeoutError) as exc:
            log.warning("node %d agent at %s: bad greeting (%s); dropped", node, peer, exc)
            await link.aclose()
            return None
        if node not in self.node_ranks:
            await link.aclose()
            self._fail(
                None,
                f"node {node} (agent at {peer}) is not part of this run: nodes are {sorted({0, *self.node_ranks})}",
            )
            return None
        if node in self._links:
            log.warning("node %d connected twice (again from %s); refused the second", node, peer)
            await link.aclose()
            return None
        needed = len(self.node_ranks[node])
        if hello.world_size < needed:
            await link.aclose()
            self._fail(
                None,
                f"node {node} offers {hello.world_size} local ranks (--nproc) but the config puts {needed} there",
            )
            return None
        self._links[node] = link
        return node, link

    async def _watch(self, node: int, link: tcp.TcpTransport) -> None:
        while True:
            try:
                msg = decode(await link.recv_frame())
            except TransportError as exc:
                self._lost(node, f"node {node}'s agent went away: {exc}")
                return
            if isinstance(msg, WorkerError):
                killed = msg.kind == "ProcessKilled"
                self._dead[msg.rank] = (killed, f"{msg.message} (node {node})")
                if killed:  # else the executor's monitor decides (the rank's own report may come)
                    self._fail(msg.rank, f"{msg.message} (node {node})")
            elif not isinstance(msg, Heartbeat):
                log.warning("unexpected %s from node %d's agent", type(msg).__name__, node)

    def _lost(self, node: int, reason: str) -> None:
        if self._closing:
            return
        for rank in self.node_ranks[node]:
            self._dead.setdefault(rank, (False, reason))
        self._fail(None, reason)

    async def aclose(self, *, stop_agents: bool, grace: float = 5.0) -> None:
        """Stop listening; tell agents to exit (`stop_agents`) or just hang up (they then
        kill their ranks and reconnect for the next group); wait up to `grace` for them."""
        self._closing = True
        if self._sock is not None:
            with contextlib.suppress(Exception):
                anyio.notify_closing(self._sock)
            self._sock.close()
        links = list(self._links.values())
        if stop_agents:
            for link in links:
                with contextlib.suppress(TransportError):
                    await link.send_frame(encode(Shutdown()))
            with anyio.move_on_after(grace):  # the agent hangs up once its ranks are gone
                for link in links:
                    with contextlib.suppress(TransportError):
                        while True:
                            await link.recv_frame()
        for link in links:
            await link.aclose()


# ------------------------------------------------------------------------------ agent side


def connect_to_head(
    head: str, token: bytes, node_rank: int, timeout: float = 10.0
) -> tcp.TcpTransport:
    """Announce `node_rank`, authenticate, return the link (blocking).

    Raises `AuthenticationError` (wrong token), `OSError` (head not reachable)."""
    host, _, port = head.rpartition(":")
    sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    try:
        sock.sendall(NODE_MAGIC + node_rank.to_bytes(4, "big"))
        tcp.client_handshake(sock, token, timeout)
    except BaseException:
        sock.close()
        raise
    return tcp.TcpTransport(sock, max_message_size=tcp.DEFAULT_MAX_MESSAGE_SIZE)


class _Agent:
    """One generation: the ranks the head gave us on one connection."""

    def __init__(self, link: tcp.TcpTransport, node_rank: int) -> None:
        self.link, self.node_rank = link, node_rank
        self.ranks: dict[int, WorkerProcess] = {}
        self.reported: set[int] = set()

    def run(self) -> bool:
        """Serve until the head says Shutdown (True) or goes away (False)."""
        next_beat, seq = 0.0, 0
        while True:
            now = time.monotonic()
            if now >= next_beat:
                seq += 1
                self.link.send_frame_blocking(encode(Heartbeat(rank=self.node_rank, seq=seq)))
                next_beat = now + AGENT_HEARTBEAT
            self._report_dead()
            try:
                msg = decode(self.link.recv_frame_blocking(0.1))
            except TimeoutError:
                continue
            if isinstance(msg, InitWorker):
                config = {**msg.config, "parent_pid": os.getpid()}  # the ranks watch us
                rank = int(config["rank"])
                process = launch_worker(config)
                self.ranks[rank] = process
                log.info("node %d: started rank %d (pid %s)", self.node_rank, rank, process.pid)
            elif isinstance(msg, Shutdown):
                return True

    def _report_dead(self) -> None:
        for rank, process in self.ranks.items():
            code = process.returncode
            if rank not in self.reported and code is not None:
                self.reported.add(rank)
                message = describe_exit(code)
                kind = "ProcessKilled" if code < 0 else "ProcessExited"
                log.error("node %d: rank %d %s", self.node_rank, rank, message)
                self.link.send_frame_blocking(
                    encode(WorkerError(rank=rank, kind=kind, message=message, traceback=""))
                )

    def stop(self, grace: float) -> None:
        """Give the ranks `grace` seconds to exit (they got Shutdown on their channels), then
        terminate and kill them."""
        reap_workers(list(self.ranks.values()), grace)
        self.link.close()


def run_node_agent(
    head: str,
    token: str | bytes,
    node_rank: int,
    *,
    nproc: int | None = None,
    connect_timeout: float = 60.0,
    grace: float = 5.0,
) -> int:
    """Run node `node_rank`'s agent until the head says Shutdown; returns the exit status.

    Connects (retrying for `connect_timeout` seconds, also after the head hung up to restart
    its worker group), then serves one generation of ranks at a time. Exit status 0 after
    Shutdown, 1 if the head stays unreachable, 3 if the head refused our token.
    """
    if node_rank < 1:
        raise ValueError(f"node rank {node_rank}: node 0 is the head; agents run nodes 1, 2, ...")
    key = token.encode() if isinstance(token, str) else token
    nproc = nproc or os.cpu_count() or 1
    # Ranks start with sleeping OpenMP waiters unless the user chose (`launch_worker`).
    while True:
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                link = connect_to_head(head, key, node_rank)
                break
            except AuthenticationError as exc:
                log.error("node %d: the head at %s refused us: %s", node_rank, head, exc)
                return EXIT_AUTH
            except (OSError, TransportError) as exc:
                if time.monotonic() > deadline:
                    log.error(
                        "node %d: head %s unreachable for %.0f s: %s",
                        node_rank,
                        head,
                        connect_timeout,
                        exc,
                    )
                    return EXIT_UNREACHABLE
                time.sleep(0.5)
        log.info("node %d: connected to head %s", node_rank, head)
        agent = _Agent(link, node_rank)
        told_to_exit = False
        try:
            link.send_frame_blocking(
                encode(Hello(rank=node_rank, world_size=nproc, pid=os.getpid()))
            )
            told_to_exit = agent.run()
        except TransportError as exc:
            log.warning("node %d: lost the head (%s); stopping local ranks", node_rank, exc)
        finally:
            agent.stop(grace if told_to_exit else 0.0)
        if told_to_exit:
            log.info("node %d: shutdown requested; exiting", node_rank)
            return EXIT_OK


def agent_main(argv: Sequence[str] | None = None) -> int:
    """`shardline worker ...`: parse arguments, run the agent, return its exit status."""
    parser = argparse.ArgumentParser(
        prog="shardline worker", description="Run one non-head node's ranks."
    )
    parser.add_argument(
        "--head", required=True, metavar="HOST:PORT", help="the head's agent address"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("SHARDLINE_TOKEN"),
        help="shared secret (or $SHARDLINE_TOKEN)",
    )
    parser.add_argument(
        "--node-rank", type=int, required=True, metavar="K", help="this node's index, >= 1"
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="ranks this node can run (default: CPU count)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="keep trying to reach the head this long",
    )
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("--token (or $SHARDLINE_TOKEN) is required")
    if ":" not in args.head:
        parser.error(f"--head must be HOST:PORT, got {args.head!r}")
    if args.node_rank < 1:
        parser.error(f"--node-rank must be >= 1 (node 0 is the head), got {args.node_rank}")
    from shardline import log

    log.configure(log.level_from_env(), f"agent {args.node_rank}")
    # SIGTERM -> SystemExit, so the finally blocks stop the local ranks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    return run_node_agent(
        args.head,
        args.token,
        args.node_rank,
        nproc=args.nproc,
        connect_timeout=args.connect_timeout,
    )


if __name__ == "__main__":
    sys.exit(agent_main())
