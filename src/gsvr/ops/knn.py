"""K nearest neighbours of query points among Gaussian means.

Backends: ``faiss`` (exact flat L2 index; GPU index when the tensors live on CUDA and
faiss has GPU support), ``kdtree`` (scipy's cKDTree, all cores), ``torch`` (chunked
brute force, any device). ``auto`` picks kdtree on CPU (measured faster than faiss'
flat index on 2 cores, see bench/knn_backends.py) and faiss/torch on CUDA.
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
