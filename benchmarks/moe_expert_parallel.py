"""One MoE layer's step time on CPU: EP=1 (one process, every expert) against EP=2 (two gloo
ranks, each half the experts) combining by all-reduce or by all-to-all, split into router,
experts and communication.

    python benchmarks/moe_expert_parallel.py [--tokens 16 256] [--repeats 30]

Mixtral-like shape scaled down (hidden 1024, 8 experts of 2048, top-2). Prints a table and
writes benchmarks/results/moe_expert_parallel.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import statistics
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HIDDEN, EXPERTS, TOP_K, INTERMEDIATE = 1024, 8, 2, 2048


def build(ctx):
    from shardline.model.moe import SparseMoeBlock

    torch.manual_seed(0)
    config = SimpleNamespace(hidden_size=HIDDEN, hidden_act="silu")
    block = SparseMoeBlock(config, ctx, torch.float32, num_experts=EXPERTS, top_k=TOP_K,
                           intermediate_size=INTERMEDIATE, renormalize=True)
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.05)
        block.experts.w13_weight.normal_(0, 0.02)
        block.experts.w2_weight.normal_(0, 0.02)
    return block


def measure(ctx, tokens_list, repeats):
    """{tokens: {phase: median ms}} with phases router, experts, comm, total."""
    from shardline.model.moe import route
    from shardline.model.parallel.collectives import all_reduce

    block = build(ctx)
    experts = block.experts
    out = {}
    for tokens in tokens_list:
        hidden = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))
        samples = {"router": [], "experts": [], "comm": [], "total": []}
        for i in range(repeats + 3):
            if ctx.ep_size > 1:
                dist.barrier()
            start = time.perf_counter()
            logits = block.gate(hidden)
            weights, ids = route(logits, TOP_K, True, hidden.dtype)
            routed = time.perf_counter()
            if ctx.ep_size > 1 and os.environ.get("SHARDLINE_EP_COMM") == "alltoall":
                block(hidden)  # the all-to-all path: dispatch, experts and gather inside
                done = time.perf_counter()
                local = experts._local_experts(hidden, weights, ids)  # experts alone, for the split
                expert_time = time.perf_counter() - done
                total = done - start
                computed = routed + expert_time / 2  # each rank runs ~half the pairs
            else:
                local = experts._local_experts(hidden, weights, ids)
                computed = time.perf_counter()
                if ctx.ep_size > 1:
                    all_reduce(local, ctx)  # as the model: shared memory when chosen, else gloo
                total = time.perf_counter() - start
            if i >= 3:
                samples["router"].append(routed - start)
                samples["experts"].append(computed - routed)
                samples["comm"].append(total - (computed - start))
                samples["total"].append(total)
        out[tokens] = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
    return out


def rank_main(rank, port, tokens_list, repeats, comm, queue):
    from shardline.model.parallel_context import init_distributed

    os.environ["SHARDLINE_EP_COMM"] = comm
    torch.set_num_threads(1)
    ctx = init_distributed(rank=rank, world_size=2, tp_size=2, pp_size=1,
                           init_method=f"tcp://127.0.0.1:{port}", backend="gloo",
                           enable_expert_parallel=True)
    result = measure(ctx, tokens_list, repeats)
    if rank == 0:
        queue.put((comm, result, ctx.tp_comm_backend))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main():
    from shardline.model.parallel_context import ParallelContext

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = {"EP=1": measure(ParallelContext.single(), args.tokens, args.repeats)}
    queue = mp.get_context("spawn").Queue()
    for comm in ("allreduce", "alltoall"):
        mp.spawn(rank_main, args=(free_port(), args.tokens, args.repeats, comm, queue), nprocs=2)
        name, result, backend = queue.get()
        rows[f"EP=2 {name} ({backend})"] = result
    print(f"{'config':32} {'tokens':>6} {'router':>8} {'experts':>8} {'comm':>8} {'total ms':>9}")
    for name, result in rows.items():
        for tokens, phases in result.items():
            print(f"{name:32} {tokens:>6} {phases['router']:8.2f} {phases['experts']:8.2f} "
                  f"{phases['comm']:8.2f} {phases['total']:9.2f}")
    out = pathlib.Path(__file__).parent / "results" / "moe_expert_parallel.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
