"""Benchmark: top-K neighbour search backends at the engine's typical size (prints a table).

    python bench/knn_backends.py [--points 50000] [--queries 112000] [--k 32]
"""

import argparse
import os
import platform
import time

import torch

from gsvr.ops.knn import knn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--points", type=int, default=50_000)
    p.add_argument("--queries", type=int, default=112_000)
    p.add_argument("--k", type=int, default=32)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(args.points, 3, generator=g) * torch.tensor([60.0, 75.0, 60.0])
    qs = torch.rand(args.queries, 3, generator=g) * torch.tensor([60.0, 75.0, 60.0])
    print(f"# {platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"# {args.points} points, {args.queries} queries, k={args.k}")
    print("| backend | seconds |\n|---|---|")
    for backend in ("kdtree", "faiss", "torch"):
        t = time.perf_counter()
        knn(pts, qs, args.k, backend=backend)
        print(f"| {backend} | {time.perf_counter() - t:.2f} |", flush=True)


if __name__ == "__main__":
    main()
