"""Two-node runs on one machine: node 1's rank is started by a `shardline worker` agent in
its own network namespace (or on loopback), the head's rank stays on shared memory."""

from __future__ import annotations

import os
import pathlib
import secrets
import signal

import anyio
import psutil
import pytest

from multinode.nodes import Agents, Topology
from shardline.engine import Engine, EngineConfig, SamplingParams
from shardline.engine.config import ConfigError
from shardline.engine.executor import WorkerFailure
from support.generation import generate_all
from support.leaks import our_shm_entries
from support.waiting import wait_until

PROMPTS = ["hello world", "the quick brown fox", "abc", "a longer prompt that spans a few blocks"]
PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _cfg(path: pathlib.Path, **kw: object) -> EngineConfig:
    base: dict[str, object] = dict(
        model=str(path), max_model_len=256, num_kv_blocks=64, block_size=4
    )
    base.update(kw)
    return EngineConfig(**base)  # type: ignore[arg-type]


def _two_nodes(path: pathlib.Path, topology: Topology, token: str, **kw: object) -> EngineConfig:
    return _cfg(
        path,
        tensor_parallel_size=2,
        nodes=2,
        head_host=topology.head_host,
        head_port=topology.free_port(),
        tcp_token=token,
        **kw,
    )


async def _generate(engine: Engine) -> list[list[int]]:
    return await generate_all(engine, PROMPTS, PARAMS)


async def _start_error(config: EngineConfig) -> str:
    """Engine.start must fail with our WorkerFailure (possibly inside an ExceptionGroup)."""
    try:
        engine = await Engine.start(config)
    except BaseException as exc:  # noqa: BLE001 - unwrapped below, re-raised if foreign
        leaves: list[BaseException] = [exc]
        while any(hasattr(e, "exceptions") for e in leaves):  # (Base)ExceptionGroup, 3.10-safe
            leaves = [x for e in leaves for x in getattr(e, "exceptions", [e])]
        failures = [e for e in leaves if isinstance(e, WorkerFailure)]
        if not failures:
            raise
        return str(failures[0])
    await engine.aclose()
    raise AssertionError("the engine started although it should not have")


def _our_shm() -> list[str]:
    """Shared-memory names this process created (other test sessions may share /dev/shm)."""
    return [n for n in our_shm_entries() if f"shardline_{os.getpid()}_" in n]


async def test_two_nodes_same_tokens_as_one(
    tiny_llama_dir: pathlib.Path, topology: Topology, agents: Agents
) -> None:
    """TP=2 with one rank per node gives single-node greedy tokens; the agent exits on Shutdown."""
    async with await Engine.start(_cfg(tiny_llama_dir, transport="inproc")) as engine:
        reference = await _generate(engine)
    token = secrets.token_hex(16)
    config = _two_nodes(tiny_llama_dir, topology, token, worker_start_timeout=120.0)
    agent = agents.start(f"{topology.head_host}:{config.head_port}", token, 1)
    async with await Engine.start(config) as engine:
        (head_rank,) = engine._cores[0].executor.worker_pids  # rank 0 runs here, on shared memory
        # Both nodes start their ranks through the same launcher: the worker program.
        assert psutil.Process(head_rank).cmdline()[-2:] == ["-m", "shardline.worker"]
        assert len(_rank_pids(agent.pid)) == 1
        assert await _generate(engine) == reference
    log = await anyio.to_thread.run_sync(agents.wait, agent)
    assert agent.returncode == 0, log
    assert "started rank 1" in log and "shutdown requested" in log, log
    # One machine, one /dev/shm and pid namespace (node 1's own network namespace does not
    # change that): the ranks count as one host, so auto mode timed shm against gloo.
    assert "TP collectives over" in log and "(auto: median" in log, log
    assert all(len(t) == PARAMS.max_tokens for t in reference)
    assert not _our_shm()


async def test_two_hosts_take_the_cross_host_path_with_the_same_tokens(
    tiny_llama_dir: pathlib.Path,
    preferred_topology: Topology,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: pathlib.Path,
) -> None:
    """SHARDLINE_HOST_ID differs between the nodes, so the same-host check sees two hosts and
    the TP collectives go over gloo between the nodes (the path separate machines take),
    whatever SHARDLINE_TP_ALLREDUCE asks for short of shm: single-node greedy tokens."""
    async with await Engine.start(_cfg(tiny_llama_dir, transport="inproc")) as engine:
        reference = await _generate(engine)
    topology = preferred_topology
    if topology.head_ifname:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", topology.head_ifname)
    monkeypatch.setenv("SHARDLINE_TP_ALLREDUCE", "auto")  # would pick shm on one host
    monkeypatch.setenv("SHARDLINE_HOST_ID", "node-0")  # the head's rank inherits it
    monkeypatch.setenv("SHARDLINE_LOG_LEVEL", "INFO")
    agents = Agents(topology, tmp_path)
    token = secrets.token_hex(16)
    config = _two_nodes(tiny_llama_dir, topology, token, worker_start_timeout=120.0)
    try:
        agent = agents.start(f"{topology.head_host}:{config.head_port}", token, 1,
                             env={"SHARDLINE_HOST_ID": "node-1"})  # fmt: skip
        async with await Engine.start(config) as engine:
            assert await _generate(engine) == reference
        log = await anyio.to_thread.run_sync(agents.wait, agent)
    finally:
        agents.stop()
    assert agent.returncode == 0, log
    assert "TP collectives over gloo: the 2 TP ranks are on 2 hosts" in log, log
    assert "(auto: median" not in log and "shared memory" not in log, log
    assert not _our_shm()


async def test_wrong_token_is_refused_and_named(
    tiny_llama_dir: pathlib.Path, topology: Topology, agents: Agents
) -> None:
    """The head waits for node 1 until its deadline (a peer failing authentication does not
    fail the start: it might be a stray or hostile one), then names the node and the wrong
    token; the agent itself exits at once with status 3."""
    config = _two_nodes(tiny_llama_dir, topology, secrets.token_hex(16), worker_start_timeout=8.0)
    agent = agents.start(
        f"{topology.head_host}:{config.head_port}", "not-the-token", 1, token_via="flag"
    )
    message = await _start_error(config)
    assert "node(s) [1] (ranks [1]) did not connect" in message, message
    assert "node 1 failed authentication: it presented a wrong token" in message, message
    log = await anyio.to_thread.run_sync(agents.wait, agent)
    assert agent.returncode == 3, log  # the agent gives up: a token does not fix itself
    assert "refused" in log, log
    assert not _our_shm()


async def test_missing_node_times_out_naming_it(
    tiny_llama_dir: pathlib.Path, topology: Topology
) -> None:
    config = _two_nodes(tiny_llama_dir, topology, secrets.token_hex(16), worker_start_timeout=4.0)
    message = await _start_error(config)
    assert "node(s) [1]" in message and "ranks [1]" in message and "did not connect" in message, (
        message
    )
    assert not _our_shm()


def test_inconsistent_node_split_is_refused_naming_numbers(tiny_llama_dir: pathlib.Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"world size 2 = tensor_parallel_size 2 x pipeline_parallel_size 1, but ranks_per_node \(1, 2\) sums to 3",
    ):
        _cfg(
            tiny_llama_dir,
            tensor_parallel_size=2,
            nodes=2,
            ranks_per_node=(1, 2),
            head_port=1,
            tcp_token="t",
        )
    with pytest.raises(ConfigError, match="world size 3 .* does not split evenly over 2 nodes"):
        _cfg(tiny_llama_dir, tensor_parallel_size=3, nodes=2, head_port=1, tcp_token="t")
    with pytest.raises(ConfigError, match="head_port"):
        _cfg(tiny_llama_dir, tensor_parallel_size=2, nodes=2, tcp_token="t")
    with pytest.raises(ConfigError, match="tcp_token"):
        _cfg(tiny_llama_dir, tensor_parallel_size=2, nodes=2, head_port=1)


def _rank_pids(agent_pid: int) -> list[int]:
    """The worker ranks an agent started: `python -m shardline.worker` programs, as the head's."""
    return [
        child.pid
        for child in psutil.Process(agent_pid).children(recursive=True)
        if child.cmdline()[-2:] == ["-m", "shardline.worker"]
    ]


async def test_dead_remote_rank_is_reported_and_the_group_restarts(
    tiny_llama_dir: pathlib.Path,
    preferred_topology: Topology,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGKILL node 1's rank: its agent reports it, the head restarts the group (the agent hangs
    up its dead generation and reconnects for the next), and the tokens stay the same."""
    topology = preferred_topology
    if topology.head_ifname:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", topology.head_ifname)
    agents = Agents(topology, tmp_path)
    token = secrets.token_hex(16)
    config = _two_nodes(
        tiny_llama_dir,
        topology,
        token,
        worker_start_timeout=120.0,
        max_worker_restarts=1,
        restart_backoff=0.1,
    )
    try:
        agent = agents.start(f"{topology.head_host}:{config.head_port}", token, 1)
        async with await Engine.start(config) as engine:
            before = await _generate(engine)
            (victim,) = _rank_pids(agent.pid)
            os.kill(victim, signal.SIGKILL)
            await wait_until(lambda: engine.stats().num_restarts >= 1, deadline_s=120)
            assert await _generate(engine) == before
            assert engine.stats().num_restarts == 1
        log = await anyio.to_thread.run_sync(agents.wait, agent)
    finally:
        agents.stop()
    assert agent.returncode == 0, log
    assert log.count("started rank 1") == 2, log
    # Whoever notices first names rank 1: its TCP channel at the head, or its agent.
    failures = [r.getMessage() for r in caplog.records if "worker group failed" in r.getMessage()]
    assert failures and "rank 1" in failures[0], failures
    assert not _our_shm()
