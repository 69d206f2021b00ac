"""Benchmark: the packed Gaussian sum (forward, and forward with backward) per chunk size (prints a table).

The refine stage evaluates the field at ~0.25-0.5 M output voxels, K = 32 neighbours each, chunk by chunk in grid
order; this times the same work on a synthetic field: the 0.8 mm voxels of a brain-sized ellipsoid (semi-axes 30, 37.5
and 30 mm: about 276 000), in grid order, each with its K nearest of Gaussian means drawn in the ellipsoid, so the chunk
size of ``model.chunk_pixels`` can be read off per million (voxel, neighbour) pairs.

    python bench/render_kernel.py [--gaussians 50000] [--k 32] [--chunks 2048 8192 32768]
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
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--chunks", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    semi = torch.tensor([30.0, 37.5, 30.0])
    axes = [torch.arange(-a, a + 0.4, 0.8) for a in semi.tolist()]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)  # grid order
    points = points[((points / semi) ** 2).sum(-1) <= 1]
    means = (2 * torch.rand(4 * args.gaussians, 3, generator=g) - 1) * semi
    means = means[((means / semi) ** 2).sum(-1) <= 1][: args.gaussians]
    nbr = knn(means, points, args.k)
    scale = 0.5 + torch.rand(args.gaussians, 3, generator=g)  # axis-aligned Gaussians, standard deviations 0.5-1.5 mm
    packed = torch.cat([means, 1 / scale**2, torch.zeros(args.gaussians, 3), torch.rand(args.gaussians, 1, generator=g)], 1)
    n = len(points)
    pairs = n * args.k / 1e6
    print(f"# {platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"# {args.gaussians} Gaussians, {n} voxels, K={args.k} ({pairs:.1f} M pairs), mode normalized")
    print("| chunk (voxels) | forward s | forward + backward s | ms per M pairs (both) |\n|---|---|---|---|")
    for chunk in args.chunks:
        def forward() -> None:
            with torch.no_grad():
                for s in range(0, n, chunk):
                    gaussian_sum_packed(points[s:s + chunk], nbr[s:s + chunk], packed, mode="normalized")

        def both() -> None:
            leaf = packed.clone().requires_grad_(True)
            for s in range(0, n, chunk):
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
