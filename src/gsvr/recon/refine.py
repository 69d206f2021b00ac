"""Refinement of a fitted Gaussian field on the slices, through the PSF quadrature, stopped on held-out slices.

The field predicts a pixel the way the voxel super-resolution does: sampled (each point's K nearest Gaussians, as the
output volume is sampled) at the Gauss-Hermite nodes of the slice PSF around the pixel
(:func:`gsvr.recon.svr.psf_quadrature`), weighted, times the slice's intensity scale. This render predicts slices it
has not seen as well as the voxel volume does, where the PSF-blurred Gaussians of the joint stage predict them worse
(docs/results.md section 19): refining through it moves the field towards what the slices agree on instead of towards
the render's own error. How far is chosen from the data: :func:`refine_field` with held-out slices stops where their
error is smallest.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from gsvr.model.field import GaussianField
from gsvr.ops.gaussians import gaussian_sum_packed, pack_tables
from gsvr.ops.knn import knn
from gsvr.recon.config import ModelConfig, RefineConfig, SvrSettings
from gsvr.recon.slices import SliceData, SliceMotion
from gsvr.recon.svr import psf_quadrature, step_sample


def holdout_slices(n_slices: int, fraction: float) -> Tensor:
    """[M] bool: ``round(fraction * n_slices)`` slices (at least one, never all: none of one slice), those with the smallest
    multiplicative hash of their index: the same slices in every run, spread over the stacks and their depth."""
    idx = torch.arange(n_slices, dtype=torch.int64)
    n_held = min(max(1, round(fraction * n_slices)), n_slices - 1)
    held = torch.zeros(n_slices, dtype=torch.bool)
    held[torch.argsort((idx * 2654435761) % 2**32)[:n_held]] = True
    return held


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
        means = field.means.detach()
        self.nbr = torch.cat([knn(means, nodes[i : i + chunk], k, backend=backend).to(torch.int32)
                              for i in range(0, len(nodes), chunk)]).reshape(p, n_nodes, k)

    def error(self, field: GaussianField, model: ModelConfig, rows: Tensor | None = None, *, backward: bool = False) -> float:
        """sum w (prediction - y)^2 / sum w over the pixels ``rows`` (all when None), chunk by chunk; with ``backward``
        its gradient is accumulated into the field's parameters."""
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


def refine_field(field: GaussianField, train: PsfQuadrature, cfg: RefineConfig, model: ModelConfig, *, k: int, steps: int,
                 held: PsfQuadrature | None = None, on_step: Callable[[int, float], None] | None = None,
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
            err = held.error(field, model)
            if on_held is not None:
                on_held(step, err)
            if err < best:
                best, best_step, stale = err, step, 0
            else:
                stale += 1
                if stale >= cfg.patience:
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
