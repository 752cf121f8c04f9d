"""Time of one plain temperature draw per row (worker/draw.py) against the vocabulary-order
inverse CDF it replaced, alternating in one run.

Rows are log-softmax of Gaussian logits over SmolLM2's vocabulary (49,152) scaled by `--scales`
(3: a peaked row, most draws in the 64-token head; 1: a flat row, most draws in the tail), for
1, 16 and 64 rows; the median of `--rounds` alternating rounds of `--repeat` calls each, on the
worker's thread count (2).

    python benchmarks/sampler_draw.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from shardline.worker import draw


def vocabulary_order(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The draw before (vocabulary order, float64 weights)."""
    weights = torch.exp((logits - logits.max(dim=-1, keepdim=True).values).double())
    cdf = weights.cumsum(dim=-1)
    index = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    return index.clamp_(max=logits.shape[1] - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scales", default="3,1")
    parser.add_argument("--rows", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    print(f"load average {os.getloadavg()[0]:.2f}")
    for scale in (float(s) for s in args.scales.split(",")):
        for rows in (int(r) for r in args.rows.split(",")):
            logits = torch.log_softmax(torch.randn(rows, 49152, generator=gen) * scale, dim=-1)
            times: dict[str, list[float]] = {"vocabulary order": [], "probability order": []}
            for _ in range(args.rounds):
                u = torch.rand(rows, dtype=torch.float64, generator=gen)
                for name, fn in (("vocabulary order", vocabulary_order),
                                 ("probability order", draw._draw_plain)):
                    fn(logits, u)
                    start = time.perf_counter()
                    for _ in range(args.repeat):
                        fn(logits, u)
                    times[name].append((time.perf_counter() - start) / args.repeat * 1e3)
            medians = ", ".join(f"{k} {statistics.median(v):.2f} ms" for k, v in times.items())
            print(f"scale {scale:g}, {rows} rows: {medians}")


if __name__ == "__main__":
    main()
