"""One CUDA decode step of a SmolLM2-sized model: CUDA graph replay vs eager, per context length,
then torch.profiler's GPU-time table of replayed steps (benchmarks/RESULTS.md section 7).

    python benchmarks/cuda_step_profile.py MODEL_DIR [--batch 64] [--contexts 150,1000]

MODEL_DIR: a SmolLM2 directory; with only its config and tokenizer (as on a device machine), a
random-weight model of its shape is written to benchmarks/out/smollm2-shaped-8h first.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]

BLOCK_SIZE = 16
NUM_BLOCKS = 4096
MAX_MODEL_LEN = 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--contexts", default="150,1000", help="context lengths to time, comma-separated")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from scaleout_bench import smollm2_shaped_model
    from shardline.model.attention import AttentionMetadata
    from shardline.model.config import ModelConfig
    from shardline.model.loader import load_model
    from shardline.model.parallel_context import ParallelContext
    from shardline.worker.cuda_graphs import CudaGraphDecoder
    from shardline.worker.kv_cache import allocate_kv_cache

    model_dir = pathlib.Path(args.model)
    if not any(model_dir.glob("*.safetensors")):
        model_dir = smollm2_shaped_model(ROOT / "benchmarks/out/smollm2-shaped-8h", model_dir)
    device = torch.device("cuda")
    config = ModelConfig.from_path(str(model_dir), dtype=torch.bfloat16, max_model_len=MAX_MODEL_LEN)
    model = load_model(config, ParallelContext.single(device))
    # One block more than the requests use: the graphs' padding rows write there.
    allocate_kv_cache(model, NUM_BLOCKS + 1, block_size=BLOCK_SIZE, dtype=torch.bfloat16, device=device)
    graphs = CudaGraphDecoder(model, block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN,
                              max_num_seqs=args.batch, pad_block=NUM_BLOCKS, device=device)
    started = time.perf_counter()
    graphs.capture()
    print(f"captured {len(graphs.graphs)} graphs in {time.perf_counter() - started:.1f} s")

    def step_inputs(context: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        blocks = context // BLOCK_SIZE + 1
        tables = [[(row * blocks + j) % NUM_BLOCKS for j in range(blocks)] for row in range(args.batch)]
        attn = AttentionMetadata.build(query_lens=[1] * args.batch, context_lens=[context] * args.batch,
                                       block_tables=tables, block_size=BLOCK_SIZE, device=device)
        ids = torch.randint(0, 1000, (args.batch,), device=device)
        return ids, torch.full((args.batch,), context, device=device), attn

    with torch.inference_mode():
        for context in map(int, args.contexts.split(",")):
            ids, positions, attn = step_inputs(context)
            for name, step in (("graph", graphs), ("eager", model)):
                step(ids, positions, attn)
                torch.cuda.synchronize()
                started = time.perf_counter()
                for _ in range(args.iters):
                    step(ids, positions, attn)
                torch.cuda.synchronize()
                ms = (time.perf_counter() - started) / args.iters * 1e3
                print(f"batch {args.batch}, context {context}: {name} {ms:.2f} ms/step")
        ids, positions, attn = step_inputs(int(args.contexts.split(",")[0]))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                graphs(ids, positions, attn)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
