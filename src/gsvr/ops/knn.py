"""K nearest neighbours of query points among Gaussian means.

Backends: ``faiss`` (exact flat L2 index; GPU index when the tensors live on CUDA and
faiss has GPU support), ``kdtree`` (scipy's cKDTree, all cores), ``torch`` (chunked
brute force, any device). ``auto`` picks kdtree on CPU (measured faster than faiss'
flat index on 2 cores: bench/knn_backends.py, figures in docs/results.md) and faiss/torch on CUDA.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

BACKENDS = ("auto", "faiss", "kdtree", "torch")


def knn(points: Tensor, queries: Tensor, k: int, *, backend: str = "auto") -> Tensor:
    """Indices of the k points nearest (Euclidean) to each query.

    Args:
        points: [N, 3] reference points (e.g. Gaussian means).
        queries: [P, 3] query points.
        k: neighbours per query (must be <= N).
        backend: one of BACKENDS.

    Returns:
        [P, k] int64 indices into ``points``, on the device of ``queries``, nearest first.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown knn backend {backend!r}; choose from {BACKENDS}")
    n = points.shape[0]
    if k > n:
        raise ValueError(f"k={k} neighbours requested but only {n} points")
    if backend == "auto":
        backend = ("faiss" if _faiss_has_gpu() else "torch") if queries.is_cuda else "kdtree"
    if backend == "kdtree":
        return _knn_kdtree(points, queries, k)
    if backend == "faiss":
        return _knn_faiss(points, queries, k)
    return _knn_torch(points, queries, k)


def _knn_kdtree(points: Tensor, queries: Tensor, k: int) -> Tensor:
    from scipy.spatial import cKDTree

    tree = cKDTree(points.detach().double().cpu().numpy())
    _, idx = tree.query(queries.detach().double().cpu().numpy(), k=k, workers=-1)
    idx = np.asarray(idx, dtype=np.int64).reshape(len(queries), k)
    return torch.from_numpy(idx).to(queries.device)


def _faiss_has_gpu() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _knn_faiss(points: Tensor, queries: Tensor, k: int) -> Tensor:
    import faiss

    xb = np.ascontiguousarray(points.detach().float().cpu().numpy())
    xq = np.ascontiguousarray(queries.detach().float().cpu().numpy())
    index = faiss.IndexFlatL2(3)
    if queries.is_cuda and _faiss_has_gpu():
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), queries.device.index or 0, index)
    index.add(xb)
    _, idx = index.search(xq, k)
    return torch.from_numpy(idx.astype(np.int64)).to(queries.device)


def _knn_torch(points: Tensor, queries: Tensor, k: int, chunk: int = 8192) -> Tensor:
    pts = points.detach().to(queries.device, torch.float32)
    out = []
    for start in range(0, len(queries), chunk):
        d = torch.cdist(queries[start : start + chunk].detach().float(), pts)
        out.append(d.topk(k, dim=1, largest=False).indices)
    return torch.cat(out) if out else torch.empty(0, k, dtype=torch.int64, device=queries.device)


def block_query(points: Tensor, queries: Tensor, block_mm: float, radius: int) -> Tensor:
    """M-Gaussian's block neighbour query: every point in the blocks (cubes of side ``block_mm`` on a
    common lattice) within ``radius`` blocks (per axis) of each query's block. A superset of the points
    within ``radius * block_mm`` of the query.

    Returns:
        [P, M] int64 indices into ``points`` (M: the largest count over the queries), padded with N
        (one past the last point), on the device of ``queries``; nearest first.
    """
    dev = queries.device
    pts, qs = points.detach().to(dev), queries.detach()
    n = pts.shape[0]
    lo = torch.minimum(pts.min(0).values, qs.min(0).values)
    bp = torch.floor((pts - lo) / block_mm).long() + radius
    bq = torch.floor((qs - lo) / block_mm).long() + radius
    dims = torch.maximum(bp.max(0).values, bq.max(0).values) + radius + 1
    strides = torch.tensor([int(dims[1] * dims[2]), int(dims[2]), 1], device=dev)
    key_p = (bp * strides).sum(-1)
    order = torch.argsort(key_p)
    counts = torch.bincount(key_p, minlength=int(dims.prod()))
    starts = torch.cumsum(counts, 0) - counts
    offsets = torch.stack(torch.meshgrid(*[torch.arange(-radius, radius + 1, device=dev)] * 3, indexing="ij"), -1).reshape(-1, 3)
    keys = (bq * strides).sum(-1)[:, None] + (offsets * strides).sum(-1)[None, :]  # [P, B] neighbouring blocks
    c, s = counts[keys], starts[keys]  # [P, B]
    total = c.sum(-1)
    width = max(int(total.max()), 1)
    out = torch.full((len(qs), width), n, dtype=torch.long, device=dev)
    col = torch.cumsum(c, -1) - c  # first column of each block's points
    rows = torch.arange(len(qs), device=dev)[:, None].expand_as(c)
    for j in range(int(counts.max()) if n else 0):
        inside = c > j
        out[rows[inside], (col + j)[inside]] = order[(s + j)[inside]]
    # Nearest first (pads last), as knn() orders its neighbours.
    valid = out < n
    dist = torch.where(valid, (pts[out.clamp_max(n - 1)] - qs[:, None, :]).square().sum(-1), torch.inf)
    return torch.gather(out, 1, torch.argsort(dist, dim=1))
