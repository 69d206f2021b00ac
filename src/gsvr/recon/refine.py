"""Refinement of a fitted Gaussian field on the slices, through the voxel operator's PSF quadrature, stopped on held-out
slices.

The field predicts a pixel the way the voxel super-resolution does, times the slice's intensity scale, by one of two
renders (``refine.sampling``):

- ``grid`` (:class:`GridQuadrature`, the default): the field sampled on the output grid (each voxel's K nearest
  Gaussians, zero beyond the support), then the voxel super-resolution's own acquisition matrix (the Gauss-Hermite
  nodes of the slice PSF, trilinear interpolation). What is refined is the volume that is output, seen by the slices
  exactly as the voxel solve sees its volume, and the field is evaluated per voxel instead of per pixel and PSF node.
- ``nodes`` (:class:`PsfQuadrature`): the field sampled at the PSF nodes around each pixel
  (:func:`gsvr.recon.svr.psf_quadrature`) and weighted.

Either predicts slices it has not seen as well as the voxel volume does, where the PSF-blurred Gaussians of the joint
stage predict them worse (docs/results.md section 19): refining through it moves the field towards what the slices
agree on instead of towards the render's own error. How far is chosen from the data: :func:`refine_field` with
held-out slices stops where their error is smallest. Measured: docs/results.md section 23.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import Tensor

from gsvr.geometry import matrix_to_axis_angle
from gsvr.model.field import GaussianField
from gsvr.ops.gaussians import (PACKED_WIDTH, gaussian_sum_packed, gaussian_sum_parts, gaussian_sum_row_grads, pack_tables,
                                scatter_matrices)
from gsvr.ops.knn import knn
from gsvr.ops.voxel import VoxelGrid
from gsvr.recon.config import ModelConfig, RefineConfig, SvrSettings
from gsvr.recon.slices import SliceData, SliceMotion
from gsvr.recon.registration import register
from gsvr.recon.svr import SliceOperator, fit_scales_and_residuals, psf_quadrature, step_sample

#: Most bytes :meth:`VoxelNeighbours.values` keeps for the gradient (32 bytes per voxel and neighbour): a chunk beyond
#: them is evaluated again by the backward pass. 512 MiB hold about 500 000 voxels at K = 32, a fetal brain's support
#: at 0.8 mm.
KEPT_BYTES = 512 * 2**20
#: Most bytes of the scatter matrices :meth:`VoxelNeighbours.backward` keeps per neighbour table (4 bytes per voxel and
#: neighbour, and 4 per Gaussian per chunk): chunks beyond them scatter by index_add_. 128 MiB hold about 800 000 voxels
#: at K = 32 and 50 000 Gaussians.
SCATTER_BYTES = 128 * 2**20


def holdout_slices(n_slices: int, fraction: float) -> Tensor:
    """[M] bool: ``round(fraction * n_slices)`` slices (at least one, never all: none of one slice), those with the smallest
    multiplicative hash of their index: the same slices in every run, spread over the stacks and their depth."""
    idx = torch.arange(n_slices, dtype=torch.int64)
    n_held = min(max(1, round(fraction * n_slices)), n_slices - 1)
    held = torch.zeros(n_slices, dtype=torch.bool)
    held[torch.argsort((idx * 2654435761) % 2**32)[:n_held]] = True
    return held


def knn_int32(means: Tensor, points: Tensor, k: int, backend: str, chunk: int) -> Tensor:
    """[P, k] int32 indices of each point's ``k`` nearest ``means``, ``chunk`` points at a time (bounding the int64 copy;
    the indices are most of a neighbour table's memory)."""
    return torch.cat([knn(means, points[i : i + chunk], k, backend=backend).to(torch.int32)
                      for i in range(0, len(points), chunk)])


class PsfQuadrature:
    """The weighted squared error of a Gaussian field's prediction of chosen slice pixels (motion frozen).

    Pixel i is predicted as s_i sum_n w_n V(x_i + o_n), V the field (K nearest Gaussians per point), o_n and w_n its
    slice's PSF nodes and weights, s_i its slice's intensity scale. The neighbours of the nodes are kept between
    :meth:`refresh` calls (as int32: a node's K indices are most of the memory)."""

    def __init__(self, data: SliceData, motion: SliceMotion, s: SvrSettings, pixels: Tensor, pixel_weight: Tensor, *,
                 psf: bool = True) -> None:
        """``psf`` false: each pixel is the field at its centre (the "no PSF" ablation, ``model.psf``)."""
        sid, x, off, self.node_w = psf_quadrature(data, motion, s, pixels)
        self.points = x[:, None, :] + off[sid]  # [p, S, 3]
        if not psf:
            self.points, self.node_w = x[:, None, :], self.node_w.new_ones(1)
        self.scale = torch.exp(motion.log_scale.detach())[sid]
        self.y = data.y[pixels]
        self.w = pixel_weight[pixels]
        self.nbr: Tensor | None = None

    @property
    def n(self) -> int:
        return len(self.y)

    def refresh(self, field: GaussianField, k: int, backend: str, chunk: int = 262_144) -> None:
        """Find each node's ``k`` nearest Gaussians of ``field`` (``chunk`` nodes at a time, bounding the int64 copy)."""
        p, n_nodes, _ = self.points.shape
        nodes = self.points.reshape(-1, 3)
        self.nbr = knn_int32(field.means.detach(), nodes, k, backend, chunk).reshape(p, n_nodes, k)

    def error(self, field: GaussianField, model: ModelConfig, rows: Tensor | None = None, *, backward: bool = False,
              keep: bool = False) -> float:
        """sum w (prediction - y)^2 / sum w over the pixels ``rows`` (all when None), chunk by chunk; with ``backward``
        its gradient is accumulated into the field's parameters. (``keep`` is :class:`GridQuadrature`'s: nothing is kept
        here between calls.)"""
        rows = torch.arange(self.n, device=self.y.device) if rows is None else rows
        total = self.w[rows].sum().clamp_min(1e-12)
        with torch.set_grad_enabled(backward):
            packed = pack_tables(field.tables())
            leaf = packed.detach().requires_grad_(backward)
            value = 0.0
            for start in range(0, len(rows), model.chunk_pixels):
                r = rows[start : start + model.chunk_pixels]
                nodes = self.points[r].reshape(-1, 3)
                vals = gaussian_sum_packed(nodes, self.nbr[r].reshape(len(nodes), -1).long(), leaf, mode=model.render_mode,
                                           delta=model.delta)
                pred = self.scale[r] * (vals.reshape(len(r), -1) * self.node_w).sum(-1)
                loss = (self.w[r] * (pred - self.y[r]) ** 2).sum() / total
                if backward:
                    loss.backward()
                value += loss.item()
            if backward:
                packed.backward(leaf.grad)
        return value

    def release(self) -> None:
        """Nothing to let go of (see :meth:`GridQuadrature.release`)."""

    def shares(self, other) -> bool:
        """Whether ``other`` evaluates the field where this does (never: each keeps its own nodes' neighbours)."""
        return False


class VoxelNeighbours:
    """The voxels where :class:`GridQuadrature` evaluates the field, and each one's K nearest Gaussians (int32), shared
    by the quadratures of one field (a split's training and held-out pixels). The voxels are those of the ``covered``
    [I, J, K] support (the output volume is zero beyond it) that some quadrature's pixels see (:meth:`see`): the
    field elsewhere changes no prediction."""

    def __init__(self, grid: VoxelGrid, covered: Tensor) -> None:
        if tuple(covered.shape) != tuple(grid.shape):
            raise ValueError(f"VoxelNeighbours: a support of shape {tuple(covered.shape)} for a grid of {tuple(grid.shape)}")
        self.grid, self.covered = grid, covered.reshape(-1)
        self.seen = torch.zeros_like(self.covered)
        self.index: Tensor | None = None  # flat grid indices of the voxels evaluated, fixed by the first refresh
        self.points: Tensor | None = None  # [V, 3] their centres (mm)
        self.nbr: Tensor | None = None  # [V, K] int32
        self._built_from: tuple | None = None  # the means (the Parameter), and its version and K, of the table
        self._values: tuple | None = None  # (the parameters and the table, their versions and settings, the values)
        self._parts: list | None = None  # per chunk, what the gradient needs of the values (None: not kept)
        self._scatter: tuple | None = None  # (chunk size, the scatter matrices of the first chunks), of this table

    def see(self, voxels: Tensor) -> None:
        """Add the voxels ``voxels`` (bool, one per grid voxel) to those evaluated (before the first :meth:`refresh`)."""
        if self.index is not None:
            raise RuntimeError("VoxelNeighbours.see after the voxels were fixed by refresh")
        self.seen |= voxels

    def refresh(self, field: GaussianField, k: int, backend: str, chunk: int = 262_144) -> None:
        """Find each voxel's ``k`` nearest Gaussians of ``field`` (the first call fixes the voxels); nothing to do when
        the table is already that of these means."""
        if self.index is None:
            self.index = torch.nonzero(self.seen & self.covered)[:, 0]
            if not len(self.index):
                raise ValueError("refine: no voxel of the output support is seen by the pixels")
            self.points = self.grid.points(self.covered.device).reshape(-1, 3)[self.index]
        if self.nbr is not None and _same((field.means,), (field.means._version, k), self._built_from):
            return
        self.nbr = knn_int32(field.means.detach(), self.points, k, backend, chunk)
        self._built_from = (field.means,), (field.means._version, k)
        self._scatter = None

    def values(self, field: GaussianField, model: ModelConfig, *, for_gradient: bool = False) -> Tensor:
        """The field at the voxels [V] (no gradient), kept until the field's parameters or the table change.
        ``for_gradient`` (a training step): keep also what :meth:`backward` needs (within ``KEPT_BYTES``), so it does
        not evaluate the field again; values kept without it (a held-out evaluation) are then computed again."""
        if self._current(field, model) and (self._parts is not None or not for_gradient):
            return self._values[2]
        self._values = self._parts = None  # freed before they are computed again
        outs, kept, size = [], [], 0
        with torch.no_grad():
            packed = pack_tables(field.tables())
            for c in self._chunks(model):
                parts = gaussian_sum_parts(self.points[c], self.nbr[c].long(), packed, mode=model.render_mode,
                                           delta=model.delta)
                outs.append(parts.out)
                nbytes = sum(t.numel() * t.element_size() for t in parts if t is not None)
                keep = for_gradient and size + nbytes <= KEPT_BYTES
                kept.append(parts if keep else None)
                size += nbytes if keep else 0
        params = tuple(field.parameters())
        self._values = params + (self.nbr,), self._key(params, model), torch.cat(outs)
        self._parts = kept if for_gradient else None
        return self._values[2]

    def release(self) -> None:
        """Let go of what :meth:`values` kept for the gradient (the values stay)."""
        self._parts = None

    def backward(self, field: GaussianField, model: ModelConfig, grad: Tensor) -> None:
        """Accumulate into the field's parameters the gradient of a loss whose gradient in the voxel values is ``grad``
        [V], chunk by chunk from what :meth:`values` kept (``for_gradient``); a chunk it did not keep is evaluated
        again, one without a non-zero gradient skipped. On the CPU each chunk's rows are added into the table by the
        sparse matrix of its neighbours (:func:`gsvr.ops.gaussians.scatter_matrices`, built at the first backward of a
        table, for as many chunks as ``SCATTER_BYTES`` hold): the sums of index_add_, in a third of the time."""
        kept = self._parts if self._parts is not None and self._current(field, model) else None
        self._parts = None  # the parameters change next
        if not grad.any():  # no gradient at all: the parameters' gradients stay unset
            return
        n_chunks = math.ceil(len(self.points) / model.chunk_pixels)
        if kept is None:
            kept = [None] * n_chunks
        on_cpu = self.nbr.device.type == "cpu"
        if on_cpu and (self._scatter is None or self._scatter[0] != model.chunk_pixels):
            self._scatter = None  # freed before it is built again
            per_chunk = 4 * (model.chunk_pixels * self.nbr.shape[1] + field.n + 1)
            n_built = min(n_chunks, SCATTER_BYTES // per_chunk) * model.chunk_pixels
            self._scatter = model.chunk_pixels, scatter_matrices(self.nbr[:n_built], field.n, model.chunk_pixels,
                                                                 dtype=field.means.dtype)
        packed = pack_tables(field.tables())
        table = packed.detach()
        total = torch.zeros_like(table)
        for i, c in enumerate(self._chunks(model)):
            parts, kept[i] = kept[i], None  # each chunk's parts let go of once used
            if not grad[c].any():
                continue
            if parts is None:
                parts = gaussian_sum_parts(self.points[c], self.nbr[c].long(), table, mode=model.render_mode,
                                           delta=model.delta)
            rows = gaussian_sum_row_grads(parts, grad[c]).reshape(-1, PACKED_WIDTH)
            if on_cpu and i < len(self._scatter[1]):
                total += self._scatter[1][i] @ rows
            else:
                total.index_add_(0, self.nbr[c].reshape(-1).long(), rows)
        packed.backward(total)

    def _chunks(self, model: ModelConfig):
        """Slices of the voxels, ``model.chunk_pixels`` at a time, as the fit stage chunks its voxels (a chunk's
        [P, K, 10] neighbour rows then stay in the CPU's cache: four times as many took twice as long per voxel,
        docs/results.md section 26)."""
        return (slice(start, start + model.chunk_pixels) for start in range(0, len(self.points), model.chunk_pixels))

    @staticmethod
    def _key(params: tuple, model: ModelConfig) -> tuple:
        return tuple(p._version for p in params), model.render_mode, model.delta

    def _current(self, field: GaussianField, model: ModelConfig) -> bool:
        """Whether the values kept are those of ``field``'s parameters now, on this table and model."""
        params = tuple(field.parameters())
        return _same(params + (self.nbr,), self._key(params, model), self._values)


def _same(tensors: tuple, key: tuple, saved: tuple | None) -> bool:
    """Whether ``saved`` (tensors, key, ...) was made from these very ``tensors`` (the objects, not equal values) and
    ``key`` (their versions and settings)."""
    return saved is not None and saved[1] == key and all(a is b for a, b in zip(saved[0], tensors, strict=True))


@torch.no_grad()
def field_on_grid(field: GaussianField, grid: VoxelGrid, covered: Tensor, model: ModelConfig, k: int) -> Tensor:
    """The field sampled at the ``covered`` [I, J, K] voxels of ``grid`` (each one's ``k`` nearest Gaussians), zero
    elsewhere: [I, J, K], as the output volume and :class:`GridQuadrature` see it."""
    voxels = VoxelNeighbours(grid, covered)
    voxels.see(voxels.covered)
    voxels.refresh(field, min(k, field.n), model.knn_backend)
    volume = torch.zeros(len(voxels.covered), device=covered.device)
    volume[voxels.index] = voxels.values(field, model)
    return volume.reshape(grid.shape)


def register_to_field(field: GaussianField, grid: VoxelGrid, covered: Tensor, data: SliceData, motion: SliceMotion,
                      s: SvrSettings, model: ModelConfig, k: int) -> tuple[Tensor, Tensor]:
    """Register every slice to the field sampled on ``grid`` (:func:`field_on_grid`) as the SVR cycles register them to
    their volume (:func:`gsvr.recon.registration.register`, settings ``s``), then refit the slices' intensity scales to
    it; ``motion`` is updated in place. Returns each slice's NCC [M] and how far its rotation turned [M] (radians)."""
    volume = field_on_grid(field, grid, covered, model, k)
    before = motion.rotation().detach().clone()
    ncc = register(volume, grid, data, motion, s)
    fit_scales_and_residuals(volume, grid, data, motion, s, torch.ones(data.n_slices, dtype=torch.bool, device=volume.device))
    with torch.no_grad():
        turned = matrix_to_axis_angle(motion.rotation() @ before.transpose(-1, -2)).norm(dim=-1)
    return ncc, turned


class GridQuadrature:
    """The weighted squared error of chosen slice pixels predicted from the field sampled on the output grid.

    Pixel i is predicted as s_i (A V)_i: V the field at the grid's covered voxels (zero elsewhere, as the output volume
    is), A the voxel super-resolution's acquisition matrix (its PSF quadrature and trilinear interpolation,
    :func:`gsvr.ops.voxel.acquisition_matrices`), s_i the slice's intensity scale. What is refined is thus the output
    grid's volume (the output samples the field there with ``output.k_neighbors``, ``model.k_neighbors`` by default),
    seen by the slices as the voxel solve sees its own. The field is evaluated per voxel, not per pixel and PSF node;
    the neighbour table is ``voxels``' (shared): only a quadrature that ``owns`` it rebuilds it on :meth:`refresh`
    (keeping it between refreshes, as the PSF-node render does for its training pixels), the others build it when it is
    missing."""

    def __init__(self, data: SliceData, motion: SliceMotion, s: SvrSettings, pixels: Tensor, pixel_weight: Tensor,
                 voxels: VoxelNeighbours, *, owns: bool, psf: bool = True) -> None:
        if not psf:  # each pixel samples the volume at its centre (the "no PSF" ablation, model.psf)
            s = dataclasses.replace(s, psf_normal=1, psf_inplane=1)
        self.op = SliceOperator(data, motion, voxels.grid, s, pixels, matrix=True)
        self.scale = torch.exp(motion.log_scale.detach())[self.op.sid]
        self.y = data.y[pixels]
        self.w = pixel_weight[pixels]
        self.voxels, self.owns = voxels, owns
        crow = self.op.a_t.crow_indices()
        voxels.see(crow[1:] > crow[:-1])  # the voxels some pixel's PSF reaches: the transpose's non-empty rows

    @property
    def n(self) -> int:
        return len(self.y)

    def refresh(self, field: GaussianField, k: int, backend: str) -> None:
        if self.owns or self.voxels.nbr is None:
            self.voxels.refresh(field, k, backend)

    def error(self, field: GaussianField, model: ModelConfig, rows: Tensor | None = None, *, backward: bool = False,
              keep: bool = False) -> float:
        """As :meth:`PsfQuadrature.error`. ``keep``: a training step at these parameters follows (a held-out evaluation
        before one): keep what its gradient needs of the values, which the step then reads instead of evaluating the
        field again (:meth:`release` lets go of them when no step follows after all)."""
        vox = self.voxels
        with torch.no_grad():
            volume = torch.zeros(vox.grid.shape, device=self.y.device).reshape(-1)
            volume[vox.index] = vox.values(field, model, for_gradient=backward or keep)
            res = self.scale * self.op.forward(volume) - self.y
            w = self.w
            if rows is not None:
                w = torch.zeros_like(w).index_copy_(0, rows, w[rows])
            total = w.sum().clamp_min(1e-12)
            value = float((w * res.square()).sum() / total)
        if backward:
            with torch.no_grad():
                grad = self.op.adjoint(2.0 * w * res * self.scale / total).reshape(-1)[vox.index]
            vox.backward(field, model, grad)
        return value

    def release(self) -> None:
        """Let go of what a ``keep`` evaluation kept for a training step that did not follow."""
        self.voxels.release()

    def shares(self, other) -> bool:
        """Whether ``other`` evaluates the field at these voxels (a split's training and held-out pixels)."""
        return isinstance(other, GridQuadrature) and other.voxels is self.voxels


def refine_field(field: GaussianField, train: PsfQuadrature | GridQuadrature, cfg: RefineConfig, model: ModelConfig, *,
                 k: int, steps: int, held: PsfQuadrature | GridQuadrature | None = None,
                 on_step: Callable[[int, float], None] | None = None,
                 on_held: Callable[[int, float], None] | None = None) -> int:
    """Adam steps (``cfg.lr``) on all of ``field``'s parameters against ``train``'s error, at most ``steps`` of them.

    Each step fits a fresh ``cfg.pixel_fraction`` of the pixels, drawn from the step number alone. With ``held``, its
    error is evaluated before the first step, every ``cfg.every`` steps and after the last (``on_held(step, error)``), and the loop
    stops after ``cfg.patience`` evaluations without a new minimum. ``on_step(step, error)`` follows each step (its
    training error, before the step's update). Returns the step count of the smallest held-out error (``steps``
    without ``held``)."""
    k = min(k, field.n)
    optimizer = torch.optim.Adam(field.param_groups(cfg.lr))
    n_rows = max(1, round(cfg.pixel_fraction * train.n))
    best, best_step, stale = math.inf, 0, 0
    for step in range(steps + 1):
        if held is not None and (step % cfg.every == 0 or step == steps):
            held.refresh(field, k, model.knn_backend)
            # a quadrature sharing the training pixels' voxels keeps what the step after it needs of their values,
            # unless that step rebuilds the neighbour table first
            keep = step < steps and held.shares(train) and not (step and step % model.knn_every == 0)
            err = held.error(field, model, keep=keep)
            if on_held is not None:
                on_held(step, err)
            if err < best:
                best, best_step, stale = err, step, 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    held.release()
                    break
        if step == steps:
            break
        if step % model.knn_every == 0:
            train.refresh(field, k, model.knn_backend)
        rows = step_sample(train.n, n_rows, step, train.y.device)
        optimizer.zero_grad(set_to_none=True)
        loss = train.error(field, model, rows, backward=True)
        optimizer.step()
        if on_step is not None:
            on_step(step + 1, loss)
    return best_step if held is not None else steps
