"""The shared token stays off the network and off command lines: a relay between head and
agent captures no token (the head sends its ranks' configs without it, the agent gives them its
own), the agent takes it from $SHARDLINE_TOKEN or a file (not visible to `ps`), and its ranks
do not inherit it. With TLS the relay sees no plaintext at all."""

from __future__ import annotations

import pathlib
import secrets
import subprocess

import anyio
import psutil
import pytest

from multinode.nodes import Agents, Topology, two_nodes
from shardline.engine import Engine, EngineConfig, SamplingParams
from shardline.engine.config import ConfigError
from shardline.engine.remote import NODE_MAGIC, NodeServer
from shardline.transport import tcp
from support.certs import make_ca
from support.relay import Relay
from support.waiting import wait_until

PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _config(path: pathlib.Path, topology: Topology, token: str, **kw: object) -> EngineConfig:
    return EngineConfig(
        model=str(path), max_model_len=128, num_kv_blocks=32, block_size=4,
        tensor_parallel_size=2, nodes=2, head_host=topology.head_host,
        head_port=topology.free_port(), tcp_token=token, worker_start_timeout=120.0, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def _ranks(agent: subprocess.Popen[bytes]) -> list[psutil.Process]:
    return [
        child
        for child in psutil.Process(agent.pid).children(recursive=True)
        if child.cmdline()[-2:] == ["-m", "shardline.worker"]
    ]


async def _generate(engine: Engine) -> list[int]:
    return [o async for o in engine.generate("hello world", PARAMS)][-1].token_ids


async def test_no_token_crosses_the_head_to_node_link(
    tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    token = secrets.token_hex(16)
    with two_nodes("loopback") as topology:
        config = _config(tiny_llama_dir, topology, token)
        agents = Agents(topology, tmp_path)
        relay = Relay((topology.head_host, config.head_port))
        try:
            agent = agents.start(f"127.0.0.1:{relay.port}", token, 1, token_via="env")
            async with await Engine.start(config) as engine:
                assert len(await _generate(engine)) == PARAMS.max_tokens
                (rank,) = _ranks(agent)
                assert token not in " ".join(psutil.Process(agent.pid).cmdline())
                assert token not in " ".join(rank.cmdline())
                assert "SHARDLINE_TOKEN" not in rank.environ()  # the agent dropped it
            log = await anyio.to_thread.run_sync(agents.wait, agent)
        finally:
            agents.stop()
            relay.close()
    assert agent.returncode == 0, log
    up, down = relay.bytes("up"), relay.bytes("down")
    assert up.startswith(NODE_MAGIC + (1).to_bytes(4, "big"))
    # The ranks' configs crossed this link (so the token could have been among them) ...
    assert str(tiny_llama_dir).encode() in down and b"channels_address" in down
    # ... but the token did not, in either direction.
    assert token.encode() not in up + down


async def test_tls_node_links_carry_no_plaintext(
    tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """Head and agent with certificates of one CA: the engine runs, the agent's link (seen by
    a relay) shows neither the node announcement nor the configs, and the remote rank attached
    to the head's TLS-only channel listener."""
    ca = make_ca(tmp_path / "ca")
    head, node = ca.leaf("head"), ca.leaf("node1")
    token = secrets.token_hex(16)
    with two_nodes("loopback") as topology:
        config = _config(
            tiny_llama_dir, topology, token,
            tls_certfile=head.certfile, tls_keyfile=head.keyfile, tls_ca_certs=head.ca_certs,
        )  # fmt: skip
        agents = Agents(topology, tmp_path)
        relay = Relay((topology.head_host, config.head_port))
        tls_args = ["--tls-certfile", node.certfile, "--tls-keyfile", node.keyfile,
                    "--tls-ca", node.ca_certs]  # fmt: skip
        try:
            agent = agents.start(f"127.0.0.1:{relay.port}", token, 1, extra=tls_args)
            async with await Engine.start(config) as engine:
                channels = engine._cores[0].executor._channels
                assert channels is not None and channels.address["tcp"]["tls"] is True
                assert len(await _generate(engine)) == PARAMS.max_tokens
            log = await anyio.to_thread.run_sync(agents.wait, agent)
        finally:
            agents.stop()
            relay.close()
    assert agent.returncode == 0, log
    seen = relay.bytes("up") + relay.bytes("down")
    assert len(seen) > 1000
    assert NODE_MAGIC not in seen and tcp.MAGIC not in seen
    assert str(tiny_llama_dir).encode() not in seen and b"channels_address" not in seen


@pytest.mark.parametrize("token_via", ["env", "file", "flag"])
async def test_the_agent_takes_its_token_from_env_or_file_off_its_command_line(
    token_via: str, tmp_path: pathlib.Path
) -> None:
    """An agent given the token through $SHARDLINE_TOKEN or --token-file authenticates and
    its command line does not show it; --token still works (and warns that it shows)."""
    token = secrets.token_hex(16)
    failures: list[str] = []
    server = NodeServer({1: []}, token.encode(), lambda rank, reason: failures.append(reason))
    server.listen("127.0.0.1", 0)
    with two_nodes("loopback") as topology:
        agents = Agents(topology, tmp_path)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.serve, {1: []})
                try:
                    agent = agents.start(server.address, token, 1, token_via=token_via)
                    await wait_until(
                        lambda: not server.missing() or agent.poll() is not None, deadline_s=60
                    )
                    assert not server.missing(), agents.log(agent)
                    shown = token in " ".join(psutil.Process(agent.pid).cmdline())
                    assert shown is (token_via == "flag")
                finally:
                    tg.cancel_scope.cancel()  # as the executor: the watchers go, then Shutdown
            await server.aclose(stop_agents=True)
            log = await anyio.to_thread.run_sync(agents.wait, agent)
        finally:
            await server.aclose(stop_agents=False, grace=0)
            agents.stop()
    assert agent.returncode == 0 and failures == [], (failures, log)
    assert ("--token is visible to every user" in log) is (token_via == "flag"), log


def test_tls_fields_are_all_or_none_and_for_node_links(tiny_llama_dir: pathlib.Path) -> None:
    base: dict[str, object] = dict(
        model=str(tiny_llama_dir), tensor_parallel_size=2, nodes=2, head_port=1, tcp_token="t"
    )
    with pytest.raises(ConfigError, match="tls_ca_certs: TLS needs all of"):
        EngineConfig(**base, tls_certfile="c.pem", tls_keyfile="k.pem")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="TLS protects the links between nodes; nodes = 1"):
        EngineConfig(model=str(tiny_llama_dir), tls_certfile="c", tls_keyfile="k", tls_ca_certs="a")
    config = EngineConfig(**base, tls_certfile="c", tls_keyfile="k", tls_ca_certs="a")  # type: ignore[arg-type]
    assert (config.tls_certfile, config.tls_keyfile, config.tls_ca_certs) == ("c", "k", "a")
