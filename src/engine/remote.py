"""Multi-node runs: the head's node server and the node agent (`shardline worker`).

Node 0 (the head) runs the Engine and its own ranks; every other node K runs::

    SHARDLINE_TOKEN=TOKEN shardline worker --head HEAD_HOST:HEAD_PORT --node-rank K [--nproc N]
        [--tls-certfile CERT --tls-keyfile KEY --tls-ca CA]

(`--token-file PATH` works too; `--token TOKEN` as well, but a command line is visible to every
user of the machine through `ps`.)

Agent <-> head protocol, on one TCP connection to HEAD_HOST:HEAD_PORT::

    both            with TLS configured (EngineConfig.tls_*, --tls-*): a mutual TLS handshake,
                    everything below then runs inside it
    agent -> head   b"SHRDNODE" + node_rank (u32, big-endian)  before authentication, so that
                                                                the head can say which node
                                                                failed it
    both            the HMAC handshake of `transport.tcp` on the shared token; from here on
                    every frame carries a sequence number and an HMAC tag (session key)
    agent -> head   Hello(rank=node_rank, world_size=nproc, pid)
    head  -> agent  InitWorker(config) per rank of that node (WorkerConfig dicts, without the
                    token or TLS paths: the agent adds its own, `with_tcp_secrets`)
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
The claimed node rank is only trusted after authentication. A peer that fails it (wrong
token, garbage, silence, a failed TLS handshake) is logged and dropped, and the head keeps
waiting for the real node until its start-up deadline (`worker_start_timeout`): one stray or
hostile connection cannot fail the start. If the node never authenticates, the deadline's
error names it and says what the peers that claimed to be it did (e.g. presented a wrong
token). An agent whose token the head refuses exits with status 3 at once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from shardline.transport import tcp
from shardline.transport.channels import with_tcp_secrets
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

    def __init__(
        self,
        node_ranks: dict[int, list[int]],
        token: bytes,
        fail: FailFn,
        tls: tcp.TlsConfig | None = None,
    ) -> None:
        self.node_ranks = node_ranks  # node -> the global ranks it runs (node 0 excluded)
        self.token = token
        self._fail = fail
        self._tls = tls.server_context() if tls is not None else None  # ValueError: bad files
        # node claimed (None: unknown, before the announcement) -> how its peers failed
        self._refusals: dict[int | None, list[str]] = {}
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
        self.address = f"{host}:{self._sock.getsockname()[1]}"  # port 0: the one it got

    def missing(self) -> list[int]:
        """Nodes whose agent has not connected (yet)."""
        return sorted(set(self.node_ranks) - set(self._links))

    def refusals(self, node: int | None) -> list[str]:
        """How the peers that claimed to be `node` (None: that never said) failed to
        authenticate, one line each."""
        return list(self._refusals.get(node, ()))

    def missing_report(self, timeout: float) -> str:
        """The start-up deadline's error: which nodes never authenticated, and why the peers
        that claimed to be them were refused."""
        missing = self.missing()
        ranks = [r for n in missing for r in self.node_ranks[n]]
        text = (
            f"node(s) {missing} (ranks {ranks}) did not connect to {self.address} within "
            f"{timeout:.0f} s"
        )
        why = [line for n in [*missing, None] for line in self._refusals.get(n, ())]
        if any("wrong token" in line for line in why):
            text += " (a peer presented a wrong token: does its agent have the head's tcp_token?)"
        if why:
            text += "; refused: " + "; ".join(why[:5]) + (" ..." if len(why) > 5 else "")
        else:
            text += (
                f"; run `SHARDLINE_TOKEN=... shardline worker --head {self.address} "
                "--node-rank K` on each"
            )
        return text

    def _refuse(self, node: int | None, peer: str, why: str) -> None:
        """Log and remember a peer that failed authentication; the start goes on."""
        who = f"node {node}" if node is not None else "a node"
        line = f"a peer at {peer} claiming to be {who} {why}"
        self._refusals.setdefault(node, []).append(line)
        log.warning("%s; dropped it, still waiting for the real one", line)

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
        admitted = await self._authenticate(sock, peer)
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
        """TLS (if configured), node announcement, HMAC handshake, Hello: the node and its
        link, or None. A peer that fails authentication is logged and dropped (the start goes
        on: see `_refuse`); an authenticated node that does not fit the run fails it."""
        sock.setblocking(False)
        try:
            if self._tls is not None:
                try:
                    sock = await tcp.tls_accept(sock, self._tls)
                except AuthenticationError as exc:
                    self._refuse(None, peer, f"failed the TLS handshake ({exc})")
                    return None
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
            try:
                session = await tcp.server_authenticate(sock, self.token)
            except tcp.WrongToken:
                sock.close()
                self._refuse(node, peer, "failed authentication: it presented a wrong token")
                return None
            except AuthenticationError as exc:
                sock.close()
                self._refuse(node, peer, f"failed authentication: {exc}")
                return None
        except BaseException:  # cancelled mid-handshake (the head is going away): no fd leak
            sock.close()
            raise
        link = tcp.TcpTransport(sock, max_message_size=tcp.DEFAULT_MAX_MESSAGE_SIZE, session=session)
        try:
            with anyio.fail_after(tcp.HANDSHAKE_TIMEOUT):
                hello = decode(await link.recv_frame())
            if not isinstance(hello, Hello) or hello.rank != node:
                raise TransportError(f"expected Hello(rank={node}), got {hello!r}")
        except (TransportError, TimeoutError) as exc:
            log.warning("node %d agent at %s: bad greeting (%s); dropped", node, peer, exc)
            await link.aclose()
            return None
        except BaseException:
            await link.aclose()
            raise
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
    head: str,
    token: bytes,
    node_rank: int,
    timeout: float = 10.0,
    *,
    tls: ssl.SSLContext | tcp.TlsConfig | None = None,
) -> tcp.TcpTransport:
    """(TLS handshake,) announce `node_rank`, authenticate, return the link (blocking).

    Raises `AuthenticationError` (wrong token, TLS refused), `OSError` (head not reachable)."""
    host, _, port = head.rpartition(":")
    sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    if tls is not None:
        context = tls.client_context() if isinstance(tls, tcp.TlsConfig) else tls
        sock = tcp.tls_connect(sock, context, timeout)
    try:
        sock.sendall(NODE_MAGIC + node_rank.to_bytes(4, "big"))
        session = tcp.client_handshake(sock, token, timeout)
    except BaseException:
        sock.close()
        raise
    return tcp.TcpTransport(sock, max_message_size=tcp.DEFAULT_MAX_MESSAGE_SIZE, session=session)


class _Agent:
    """One generation: the ranks the head gave us on one connection."""

    def __init__(
        self,
        link: tcp.TcpTransport,
        node_rank: int,
        token: bytes,
        tls: tcp.TlsConfig | None = None,
    ) -> None:
        self.link, self.node_rank = link, node_rank
        self._token, self._tls = token, tls  # what our ranks attach to the head's channels with
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
                config = {
                    **msg.config,
                    "parent_pid": os.getpid(),  # the ranks watch us
                    # The head never sends the token: the ranks get ours, on their stdin.
                    "channels_address": with_tcp_secrets(
                        dict(msg.config["channels_address"]), self._token, self._tls
                    ),
                }
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
    tls: tcp.TlsConfig | None = None,
) -> int:
    """Run node `node_rank`'s agent until the head says Shutdown; returns the exit status.

    Connects (retrying for `connect_timeout` seconds, also after the head hung up to restart
    its worker group), then serves one generation of ranks at a time. Exit status 0 after
    Shutdown, 1 if the head stays unreachable, 3 if the head refused our token (or the TLS
    handshake failed). With `tls` the link to the head and our ranks' channels use mutual TLS.
    """
    if node_rank < 1:
        raise ValueError(f"node rank {node_rank}: node 0 is the head; agents run nodes 1, 2, ...")
    key = token.encode() if isinstance(token, str) else token
    tls = tls.absolute() if tls is not None else None  # the ranks get these paths
    context = tls.client_context() if tls is not None else None  # ValueError: bad files
    nproc = nproc or os.cpu_count() or 1
    # Ranks start with sleeping OpenMP waiters unless the user chose (`launch_worker`).
    while True:
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                link = connect_to_head(head, key, node_rank, tls=context)
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
        agent = _Agent(link, node_rank, key, tls)
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


TOKEN_ENV = "SHARDLINE_TOKEN"


def read_secret_file(path: str, what: str) -> str:
    """The secret in `path` (its first line, surrounding whitespace dropped); ValueError if
    the file cannot be read or holds nothing."""
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.readline().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} file {path}: {exc}") from exc
    if not secret:
        raise ValueError(f"the {what} file {path} is empty")
    return secret


def agent_main(argv: Sequence[str] | None = None) -> int:
    """`shardline worker ...`: parse arguments, run the agent, return its exit status."""
    parser = argparse.ArgumentParser(
        prog="shardline worker",
        description="Run one non-head node's ranks. Give the shared token through "
        f"${TOKEN_ENV} or --token-file: a command line (--token) is visible to every user of "
        "the machine through `ps`.",
    )
    parser.add_argument(
        "--head", required=True, metavar="HOST:PORT", help="the head's agent address"
    )
    parser.add_argument(
        "--token",
        default=None,
        help=f"shared secret; prefer ${TOKEN_ENV} or --token-file (flags are visible in `ps`)",
    )
    parser.add_argument(
        "--token-file",
        default=None,
        metavar="PATH",
        help="read the shared secret from this file's first line",
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
    tls = parser.add_argument_group(
        "TLS", "mutual TLS for the link to the head and this node's ranks' channels (all three, "
        "matching the head's EngineConfig tls_certfile/tls_keyfile/tls_ca_certs)"
    )
    tls.add_argument("--tls-certfile", metavar="PEM", help="this node's certificate")
    tls.add_argument("--tls-keyfile", metavar="PEM", help="its private key")
    tls.add_argument("--tls-ca", metavar="PEM", help="the CA that signed every node's certificate")
    args = parser.parse_args(argv)
    if args.token and args.token_file:
        parser.error("give --token or --token-file, not both")
    token = args.token
    if args.token_file:
        try:
            token = read_secret_file(args.token_file, "token")
        except ValueError as exc:
            parser.error(str(exc))
    token = token or os.environ.get(TOKEN_ENV)
    if not token:
        parser.error(f"the shared token is required: ${TOKEN_ENV}, --token-file or --token")
    os.environ.pop(TOKEN_ENV, None)  # our ranks get the token on their stdin, not inherited
    tls_files = [args.tls_certfile, args.tls_keyfile, args.tls_ca]
    if any(tls_files) and not all(tls_files):
        parser.error("TLS needs all three of --tls-certfile, --tls-keyfile and --tls-ca")
    tls_config = tcp.TlsConfig(*tls_files) if all(tls_files) else None
    if ":" not in args.head:
        parser.error(f"--head must be HOST:PORT, got {args.head!r}")
    if args.node_rank < 1:
        parser.error(f"--node-rank must be >= 1 (node 0 is the head), got {args.node_rank}")
    from shardline import log as shardline_log

    shardline_log.configure(shardline_log.level_from_env(), f"agent {args.node_rank}")
    if args.token:
        log.warning(
            "--token is visible to every user of this machine (`ps`); use $%s or --token-file",
            TOKEN_ENV,
        )
    if tls_config is not None:
        try:
            tls_config.client_context()
        except ValueError as exc:
            parser.error(str(exc))
    # SIGTERM -> SystemExit, so the finally blocks stop the local ranks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    return run_node_agent(
        args.head,
        token,
        args.node_rank,
        nproc=args.nproc,
        connect_timeout=args.connect_timeout,
        tls=tls_config,
    )


if __name__ == "__main__":
    sys.exit(agent_main())
