"""Step time with a replica's ranks on two Ray nodes vs the `mp` backend on the same layout.

Layout: TP=2, rank 0 on the engine's node (shared-memory channel), rank 1 on a second node
(authenticated TCP channel; gloo between the ranks, `SHARDLINE_HOST_ID` differing per node).

* `ray`: a two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`, one CPU a node,
  no dashboard), `distributed_executor_backend="ray"`.
* `mp`:  `nodes=2` with a `shardline worker` agent on loopback for node 1 (the `mp` backend's
  way across nodes), `SHARDLINE_HOST_ID` set so that its rank counts as another host.

Both move the same messages over the same transports; what differs is who starts and watches
the ranks. The step time is the median gap between consecutive tokens of a decoding stream
(the batch: `--batch` greedy requests), over `--repeats` runs after a warm-up.

    python benchmarks/ray_step.py [--layers 4 --hidden 256] [--batch 4] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

PROMPT = "the quick brown fox jumps over the lazy dog"


async def measure(
    config: Any, batch: int, max_tokens: int, repeats: int
) -> tuple[float, list[float]]:
    """Engine.start's seconds, and the median inter-token gap (s) of request 0 in each of
    `repeats` runs of `batch` requests; also prints the RSS of this machine's Ray actor
    processes while the engine runs (the `ray` backend's extra processes)."""
    import anyio
    import psutil

    from shardline.engine import Engine, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    gaps: list[float] = []
    began = time.perf_counter()
    async with await Engine.start(config) as engine:
        start_s = time.perf_counter() - began
        actors = [
            p
            for p in psutil.process_iter(["cmdline"])
            if "ray::RankActor" in " ".join(p.info["cmdline"] or [])
        ]
        if actors:
            print(
                f"Ray rank actors' RSS (MB): {[round(p.memory_info().rss / 2**20) for p in actors]}"
            )
        for run in range(repeats + 1):  # run 0 warms up
            stamps: list[float] = []

            async def one(i: int, stamps: list[float] = stamps) -> None:
                async for _ in engine.generate(f"{PROMPT} {i}", params):
                    if i == 0:
                        stamps.append(time.perf_counter())

            async with anyio.create_task_group() as tg:
                for i in range(batch):
                    tg.start_soon(one, i)
            if run:
                gaps.append(
                    statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))
                )
    return start_s, gaps


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def agent(port: int, token: str) -> Iterator[None]:
    """Node 1's `shardline worker` agent on loopback."""
    env = dict(os.environ, SHARDLINE_TOKEN=token, SHARDLINE_HOST_ID="node-1")
    main = "import sys; from shardline.engine.remote import agent_main; sys.exit(agent_main())"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            main,
            "--head",
            f"127.0.0.1:{port}",
            "--node-rank",
            "1",
            "--nproc",
            "1",
        ],
        env=env,
    )
    try:
        yield
    finally:
        proc.wait(30)


def run_mp(model: str, args: argparse.Namespace) -> tuple[float, list[float]]:
    from shardline.engine import EngineConfig

    os.environ["SHARDLINE_HOST_ID"] = "node-0"  # the head's rank
    token, port = secrets.token_hex(16), free_port()
    config = EngineConfig(
        model=model,
        tensor_parallel_size=2,
        nodes=2,
        head_port=port,
        tcp_token=token,
        max_model_len=512,
        num_threads=1,
        worker_start_timeout=120.0,
    )
    try:
        with agent(port, token):
            return asyncio.run(measure(config, args.batch, args.max_tokens, args.repeats))
    finally:
        del os.environ["SHARDLINE_HOST_ID"]


def run_ray(model: str, args: argparse.Namespace) -> tuple[float, list[float]]:
    import ray
    from ray.cluster_utils import Cluster

    from shardline.engine import EngineConfig

    node = {"num_cpus": 1, "object_store_memory": 80 << 20}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")
        config = EngineConfig(
            model=model,
            tensor_parallel_size=2,
            distributed_executor_backend="ray",
            max_model_len=512,
            num_threads=1,
            worker_start_timeout=120.0,
        )
        return asyncio.run(measure(config, args.batch, args.max_tokens, args.repeats))
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = parser.parse_args()
    from support.tiny_models import make_tiny_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_tiny_model_dir(tmp, num_layers=args.layers, hidden_size=args.hidden))
        results = {"mp": run_mp(model, args), "ray": run_ray(model, args)}
    load = os.getloadavg()
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_1_5_15": [round(x, 2) for x in load],
        "model": f"random Llama, {args.layers} layers, hidden {args.hidden}",
        "batch": args.batch,
        "start_s": {k: round(start, 2) for k, (start, _) in results.items()},
        "step_ms": {k: [round(v * 1e3, 2) for v in vs] for k, (_, vs) in results.items()},
        "median_step_ms": {
            k: round(statistics.median(vs) * 1e3, 2) for k, (_, vs) in results.items()
        },
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
