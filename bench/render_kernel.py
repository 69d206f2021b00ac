"""Benchmark: the packed Gaussian sum (forward, and forward with backward) per chunk size (prints a table).

The refine stage evaluates the field at ~0.25-0.5 M output voxels, K = 32 neighbours each, chunk by chunk; this times
the same work on a synthetic field with real neighbour tables (each point's K nearest means), so the chunk size of
``model.chunk_pixels`` can be read off per million (point, neighbour) pairs.

    python bench/render_kernel.py [--gaussians 50000] [--points 262144] [--k 32] [--chunks 2048 8192 32768]
"""

import argparse
import os
import platform
import time

import torch

from gsvr.ops.gaussians import gaussian_sum_packed
from gsvr.ops.knn import knn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gaussians", type=int, default=50_000)
    p.add_argument("--points", type=int, default=262_144)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--chunks", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    extent = torch.tensor([60.0, 75.0, 60.0])
    means = torch.rand(args.gaussians, 3, generator=g) * extent
    points = torch.rand(args.points, 3, generator=g) * extent
    nbr = knn(means, points, args.k)
    scale = 0.5 + torch.rand(args.gaussians, 3, generator=g)  # precisions of Gaussians 0.7-1.4 mm wide, axis-aligned
    packed = torch.cat([means, 1 / scale**2, torch.zeros(args.gaussians, 3), torch.rand(args.gaussians, 1, generator=g)], 1)
    pairs = args.points * args.k / 1e6
    print(f"# {platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"# {args.gaussians} Gaussians, {args.points} points, K={args.k} ({pairs:.1f} M pairs), mode normalized")
    print("| chunk (points) | forward s | forward + backward s | ms per M pairs (both) |\n|---|---|---|---|")
    for chunk in args.chunks:
        def forward() -> None:
            with torch.no_grad():
                for s in range(0, args.points, chunk):
                    gaussian_sum_packed(points[s:s + chunk], nbr[s:s + chunk], packed, mode="normalized")

        def both() -> None:
            leaf = packed.clone().requires_grad_(True)
            for s in range(0, args.points, chunk):
                gaussian_sum_packed(points[s:s + chunk], nbr[s:s + chunk], leaf, mode="normalized").sum().backward()

        times = []
        for f in (forward, both):
            f()  # warm-up
            t = time.perf_counter()
            for _ in range(args.repeats):
                f()
            times.append((time.perf_counter() - t) / args.repeats)
        print(f"| {chunk} | {times[0]:.3f} | {times[1]:.3f} | {1e3 * times[1] / pairs:.0f} |", flush=True)


if __name__ == "__main__":
    main()
