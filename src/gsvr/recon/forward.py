"""The slice forward model: which Gaussians each pixel sees, and the predicted slice pixels.

A pixel of slice s at in-plane position x0 is predicted as

    y_hat = exp(log_scale_s) * sum_j  v_j N(R_s (x0 - c_s) + c_s + t_s; mu_j, Sigma_j + R_s Sigma_PSF R_s^T)

over its neighbouring Gaussians j (top-K nearest, or M-Gaussian's block query), exactly: the
PSF-blurred Gaussian is again a Gaussian. ``render_slices`` builds the per-(slice, Gaussian) pair
tables and per-slice transforms once (stage 1); ``SliceRender.predict`` renders any chunk of pixels
against detached copies of them (stage 2), and ``SliceRender.backward`` pushes the gradients the chunks
accumulated back through stage 1 in one call, so memory is bounded by the chunk size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from gsvr.model.field import GaussianField
from gsvr.ops.gaussians import PairTables, gaussian_sum_packed, pack_tables, pair_tables, unique_pairs
from gsvr.ops.knn import block_query, knn
from gsvr.recon.config import BlockQueryConfig, ModelConfig
from gsvr.recon.slices import SliceData, SliceMotion, transform_points

#: The packed pair-table row that block-query padding points at: far away, zero weight (adds nothing).
PAD_ROW = (1e4, 1e4, 1e4, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0)


def mean_spacing(means: Tensor) -> float:
    """Mean distance between Gaussians: (volume of their bounding box / N) ** (1/3), mm."""
    extent = (means.detach().max(0).values - means.detach().min(0).values).clamp_min(1e-3)
    return float((extent.prod() / means.shape[0]) ** (1 / 3))


class Neighbours:
    """Neighbours of every pixel (top-K, or M-Gaussian's block query), as rows of the (slice, Gaussian)
    pair tables; block-query padding points one past the last row (``padded``: append ``PAD_ROW``)."""

    def __init__(self, block: BlockQueryConfig | None) -> None:
        self.block = block
        self.pair_slice: Tensor | None = None  # [P] slice of each pair
        self.pair_gauss: Tensor | None = None  # [P] Gaussian of each pair
        self.nbr_pair: Tensor | None = None  # [N_pix, K] pair row of each pixel's neighbours
        self.padded = block is not None

    def refresh(self, x: Tensor, sid: Tensor, means: Tensor, k: int, backend: str) -> None:
        n = means.shape[0]
        if not self.padded:
            nbr = knn(means.detach(), x.detach(), k, backend=backend)
            self.pair_slice, self.pair_gauss, self.nbr_pair = unique_pairs(sid, nbr, n)
            return
        size = self.block.size_mm or mean_spacing(means)
        nbr = block_query(means.detach(), x.detach(), size, self.block.radius)
        valid = nbr < n
        rows = sid[:, None].expand_as(nbr)[valid]
        self.pair_slice, self.pair_gauss, inverse = unique_pairs(rows, nbr[valid][:, None], n)
        self.nbr_pair = torch.full_like(nbr, len(self.pair_slice))
        self.nbr_pair[valid] = inverse[:, 0]

    def pack(self, tables: PairTables) -> Tensor:
        packed = pack_tables(tables)
        if self.padded:
            packed = torch.cat([packed, torch.tensor([PAD_ROW], dtype=packed.dtype, device=packed.device)])
        return packed


def current_positions(data: SliceData, motion: SliceMotion) -> Tensor:
    """[N_pix, 3] world positions (mm) of the in-mask pixels under the current slice motion (no graph)."""
    with torch.no_grad():
        return transform_points(data.x0, data.slice_idx, data.centre, motion.rotation(), motion.trans)


@dataclass
class SliceRender:
    """Stage 1 of the forward model, ready to render chunks of pixels (see the module docstring)."""

    data: SliceData
    nbrs: Neighbours
    model: ModelConfig
    stage1: list  # [packed pair tables, rotation [S, 3, 3], translation [S, 3], scale [S]]
    leaves: list  # detached copies of stage1 that collect the chunks' gradients

    def predict(self, sel) -> Tensor:
        """Predicted intensities of the pixels ``sel`` (a slice or an index tensor)."""
        packed, r_leaf, t_leaf, s_leaf = self.leaves
        sid = self.data.slice_idx[sel]
        x = transform_points(self.data.x0[sel], sid, self.data.centre, r_leaf, t_leaf)
        return gaussian_sum_packed(x, self.nbrs.nbr_pair[sel], packed, mode=self.model.render_mode,
                                   delta=self.model.delta) * s_leaf[sid]

    def backward(self) -> None:
        """Push the gradients accumulated on the leaves back through stage 1."""
        pairs = [(t, leaf.grad) for t, leaf in zip(self.stage1, self.leaves) if t.requires_grad and leaf.grad is not None]
        torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])


def render_slices(field: GaussianField, motion: SliceMotion, data: SliceData, nbrs: Neighbours, *, model: ModelConfig,
                  motion_on: bool, residual: Callable[[Tensor], Tensor] | None = None) -> SliceRender:
    """Stage 1 of the forward model for the current field and motion.

    Args:
        motion_on: let gradients reach the slice rotations and translations (the scales always get them).
        residual: a residual field, means [N, 3] -> [N], added to the Gaussians' intensities.
    """
    rotation = motion.rotation() if motion_on else motion.rotation().detach()
    psf_cov = motion.psf_cov(data, rotation) if model.psf else None
    values = field.intensities if residual is None else field.intensities + residual(field.means)
    tables = pair_tables(field.means, field.log_scales, field.quats, values, psf_cov,
                         nbrs.pair_slice, nbrs.pair_gauss, mode=model.render_mode)
    trans = motion.trans if motion_on else motion.trans.detach()
    scale = torch.exp(motion.log_scale)
    stage1 = [nbrs.pack(tables), rotation, trans, scale]
    leaves = [t.detach().requires_grad_(t.requires_grad) for t in stage1]
    return SliceRender(data=data, nbrs=nbrs, model=model, stage1=stage1, leaves=leaves)
