"""Slice acquisition on a voxel grid: the classical SVR forward operator and its adjoint.

A slice pixel is the volume integrated against the slice PSF (a Gaussian in the slice frame,
rotated with the slice). The integral is Gauss-Hermite quadrature over the PSF, each node read
from the grid by trilinear interpolation (``grid_sample``). The operator is linear in the
volume; its adjoint is the vector-Jacobian product (:func:`acquire_adjoint`), and its gradient
with respect to the sample positions gives slice-to-volume registration.

For fixed positions the operator is a sparse matrix (:func:`acquisition_matrices`: each pixel's PSF nodes times
the 8 trilinear weights of each node). Iterative solves that apply it many times use that matrix and its
transpose, compressed-row products an order of magnitude faster than interpolating again each time.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: Probabilists' Gauss-Hermite rules: nodes (in standard deviations) and weights summing to 1.
_HERMITE = {
    1: ([0.0], [1.0]),
    3: ([-math.sqrt(3.0), 0.0, math.sqrt(3.0)], [1 / 6, 2 / 3, 1 / 6]),
    5: ([-2.856970013872806, -1.355626179974266, 0.0, 1.355626179974266, 2.856970013872806],
        [0.011257411327720, 0.222075922005613, 0.533333333333333, 0.222075922005613, 0.011257411327720]),
}


@dataclass(frozen=True)
class VoxelGrid:
    """An axis-aligned grid in the (origin-shifted) world frame: voxel (i, j, k) sits at corner + spacing * (i, j, k)."""

    corner_mm: tuple[float, float, float]
    spacing_mm: float
    shape: tuple[int, int, int]

    @classmethod
    def covering(cls, points_mm: Tensor, spacing_mm: float, margin_mm: float) -> "VoxelGrid":
        """Smallest grid covering ``points_mm`` [P, 3] plus a margin."""
        lo = points_mm.min(0).values.double().cpu().numpy() - margin_mm
        hi = points_mm.max(0).values.double().cpu().numpy() + margin_mm
        shape = tuple(int(math.ceil((h - l) / spacing_mm)) + 1 for l, h in zip(lo, hi))
        return cls(tuple(float(v) for v in lo), float(spacing_mm), shape)

    def points(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        """[I, J, K, 3] voxel centres (mm)."""
        axes = [torch.arange(n, device=device, dtype=dtype) * self.spacing_mm + c for n, c in zip(self.shape, self.corner_mm)]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)

    def normalised(self, points_mm: Tensor) -> Tensor:
        """mm -> grid_sample coordinates ([-1, 1], align_corners=True, order (k, j, i))."""
        corner = torch.tensor(self.corner_mm, device=points_mm.device, dtype=points_mm.dtype)
        extent = torch.tensor([(n - 1) * self.spacing_mm for n in self.shape], device=points_mm.device, dtype=points_mm.dtype)
        return (2.0 * (points_mm - corner) / extent.clamp_min(1e-6) - 1.0).flip(-1)

    def affine(self, origin_mm: np.ndarray) -> np.ndarray:
        """[4, 4] voxel -> world affine, adding back the frame origin."""
        a = np.eye(4)
        a[:3, :3] *= self.spacing_mm
        a[:3, 3] = np.asarray(self.corner_mm) + origin_mm
        return a


def psf_nodes(n_normal: int, n_inplane: int, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Quadrature nodes [S, 3] (in PSF standard deviations, slice frame) and weights [S] summing to 1."""
    if n_normal not in _HERMITE or n_inplane not in _HERMITE:
        raise ValueError(f"PSF quadrature orders must be in {sorted(_HERMITE)}")
    zn, zw = _HERMITE[n_normal]
    pn, pw = _HERMITE[n_inplane]
    nodes = [(a, b, c) for a in pn for b in pn for c in zn]
    weights = [wa * wb * wc for wa in pw for wb in pw for wc in zw]
    return torch.tensor(nodes, device=device, dtype=dtype), torch.tensor(weights, device=device, dtype=dtype)


def psf_offsets(axes: Tensor, psf_sigma: Tensor, nodes: Tensor) -> Tensor:
    """World offsets [M, S, 3] of the quadrature nodes of each slice.

    Args:
        axes: [M, 3, 3] current slice axes (columns: in-plane x, in-plane y, normal).
        psf_sigma: [M, 3] PSF standard deviations along the axes (mm).
        nodes: [S, 3] nodes in standard deviations.
    """
    return torch.einsum("mij,msj->msi", axes, nodes[None] * psf_sigma[:, None, :])


def acquire(volume: Tensor, grid: VoxelGrid, x: Tensor, offsets: Tensor, weights: Tensor) -> Tensor:
    """Simulated pixel values: sum_s w_s V(x_p + offset_s) -> [P].

    Args:
        volume: [I, J, K] voxel values.
        x: [P, 3] pixel centres after motion (mm).
        offsets: [P, S, 3] PSF node offsets of each pixel (mm).
        weights: [S] quadrature weights.
    """
    pts = grid.normalised(x[:, None, :] + offsets)  # [P, S, 3]
    vals = F.grid_sample(volume[None, None], pts[None, :, :, None, :], mode="bilinear",
                         padding_mode="zeros", align_corners=True)  # [1, 1, P, S, 1]
    return (vals[0, 0, :, :, 0] * weights).sum(-1)


def acquisition_matrices(grid: VoxelGrid, x: Tensor, offsets: Tensor, weights: Tensor, *, chunk: int = 65_536
                         ) -> tuple[Tensor, Tensor]:
    """The matrix of :func:`acquire` for fixed positions and its transpose (that of :func:`acquire_adjoint`), both sparse
    CSR with int32 indices where the grid and the entry count allow: [P, I*J*K] of ``x.dtype``, row p holding each of
    the pixel's PSF nodes' 8 trilinear weights times the node's quadrature weight, summed per voxel (corners off the
    grid dropped: ``grid_sample`` reads zeros there). So ``acquire(volume, ...) == matrix @ volume.reshape(-1)`` up to
    rounding, on grids of at least 2 voxels along each axis (``grid_sample`` reads a single voxel at full weight).

    Args:
        x: [P, 3] pixel centres (mm); offsets: [P, S, 3] PSF node offsets (mm); weights: [S] quadrature weights.
        chunk: pixels per step of the construction (bounds its temporaries).
    """
    if min(grid.shape) < 2:
        raise ValueError(f"acquisition_matrices: the grid needs 2 voxels along each axis, got {grid.shape}")
    shape = torch.tensor(grid.shape, device=x.device)
    n_vox = math.prod(grid.shape)
    index = torch.int32 if max(n_vox, len(x) * offsets.shape[1] * 8) < 2**31 else torch.int64
    corner = torch.tensor(grid.corner_mm, device=x.device, dtype=x.dtype)
    strides = torch.tensor([grid.shape[1] * grid.shape[2], grid.shape[2], 1], device=x.device)
    # corner (a, b, c) of a node's cell, a outermost: its offset from the cell's low corner in the flat grid
    steps = torch.tensor([(a * grid.shape[1] + b) * grid.shape[2] + c for a in (0, 1) for b in (0, 1) for c in (0, 1)],
                         device=x.device)

    def corners(pair: Tensor) -> Tensor:
        """[p, S, 3, 2] per axis (low, high) -> [p, S, 8], the product over the axes of each corner's entry."""
        return (pair[:, :, 0, :, None, None] * pair[:, :, 1, None, :, None] * pair[:, :, 2, None, None, :]).flatten(2)

    cols, vals, counts = [], [], []
    for start in range(0, len(x), chunk):
        u = (x[start : start + chunk, None, :] + offsets[start : start + chunk] - corner) / grid.spacing_mm  # [p, S, 3]
        base = torch.floor(u)
        frac = u - base
        low = base.long()
        w = corners(torch.stack([1 - frac, frac], -1)) * weights[:, None]  # [p, S, 8]
        inside = corners(torch.stack([(low >= 0) & (low < shape), (low >= -1) & (low < shape - 1)], -1))
        lin = torch.where(inside, (low * strides).sum(-1, keepdim=True) + steps, n_vox)
        # Each row's voxels sorted and distinct (torch's CSR invariant): sum the weights of a voxel's repeats, drop
        # the corners off the grid (sorted last, as n_vox).
        lin, order = lin.reshape(len(u), -1).sort(dim=1)
        w = w.reshape(len(u), -1).gather(1, order)
        first = torch.ones_like(lin, dtype=torch.bool)
        first[:, 1:] = lin[:, 1:] != lin[:, :-1]
        summed = torch.zeros(int(first.sum()), dtype=x.dtype, device=x.device).index_add_(
            0, first.reshape(-1).cumsum(0) - 1, w.reshape(-1))
        keep = first & (lin < n_vox)  # [p, S*8]: the entries the row keeps
        cols.append(lin[keep].to(index))
        vals.append(summed[keep[first]])
        counts.append(keep.sum(1))
    counts = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.int64, device=x.device)  # none: no pixels
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(index)
    cols = torch.cat(cols) if cols else torch.zeros(0, dtype=index, device=x.device)
    vals = torch.cat(vals) if vals else x.new_zeros(0)
    with warnings.catch_warnings():  # torch calls its sparse CSR support "beta"; matrix-vector products are all we use
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        # valid by construction (its invariants are checked in tests/ops/test_voxel.py)
        a = torch.sparse_csr_tensor(crow, cols, vals, (len(x), n_vox), check_invariants=False)
        return a, _transpose(crow, cols, vals, (len(x), n_vox))


def _transpose(crow: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int], *, counting: bool | None = None
               ) -> Tensor:
    """The transpose of the CSR matrix (``crow``, ``cols``, ``vals``) of ``shape``, CSR again: entries ordered by
    column, a column's rows kept ascending. With ``counting`` (the default on the CPU) SciPy's CSR-to-CSC conversion,
    a counting sort (several times faster than the stable argsort: docs/results.md section 27); otherwise a stable
    argsort of the columns (the same matrix as torch's CSC-to-CSR conversion, faster: section 22)."""
    n_rows, n_cols = shape
    if cols.device.type == "cpu" if counting is None else counting:
        import scipy.sparse as sp

        c = sp.csr_matrix((vals.numpy(), cols.numpy(), crow.numpy()), shape=shape).tocsc()
        crow_t, rows, vals_t = torch.from_numpy(c.indptr), torch.from_numpy(c.indices), torch.from_numpy(c.data)
    else:
        cols_t, order = torch.sort(cols, stable=True)
        rows = torch.repeat_interleave(torch.arange(n_rows, device=cols.device, dtype=cols.dtype),
                                       (crow[1:] - crow[:-1]).long())[order]
        crow_t = torch.searchsorted(cols_t, torch.arange(n_cols + 1, device=cols.device, dtype=cols.dtype))
        vals_t = vals[order]
    return torch.sparse_csr_tensor(crow_t.to(cols.dtype), rows.to(cols.dtype), vals_t, (n_cols, n_rows),
                                   check_invariants=False)


def acquire_adjoint(values: Tensor, grid: VoxelGrid, x: Tensor, offsets: Tensor, weights: Tensor) -> Tensor:
    """Adjoint of :func:`acquire` in the volume: pixel values [P] -> volume [I, J, K]."""
    zero = torch.zeros(grid.shape, device=values.device, dtype=values.dtype, requires_grad=True)
    with torch.enable_grad():
        out = acquire(zero, grid, x.detach(), offsets.detach(), weights)
        (adj,) = torch.autograd.grad(out, zero, values)
    return adj
