"""Classical slice-to-volume reconstruction on a voxel grid (SVRTK / Kuklisova-Murgasova family).

Cycles of (a) super-resolution: the volume minimising the weighted misfit of the PSF-blurred,
scaled volume to the slices plus a Tikhonov gradient penalty, solved by conjugate gradients on
the normal equations, and (b) slice-to-volume registration: every slice's rigid motion moved
to maximise its normalised cross-correlation with the fixed volume (Adam, all slices at once).
Coarse to fine: early cycles use a coarse grid, whose smooth volume widens the capture range.

Used twice: as the motion initialisation of the Gaussian engine, and as the ``svr_classic``
baseline (the voxel volume itself).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from gsvr.geometry import matrix_to_axis_angle
from gsvr.ops.knn import knn
from gsvr.ops.voxel import VoxelGrid, acquire, acquire_adjoint, acquisition_matrices, psf_nodes, psf_offsets
from gsvr.recon.config import SvrSettings
from gsvr.recon.forward import current_positions
from gsvr.recon.registration import register
from gsvr.recon.slices import SliceData, SliceMotion, transform_points

log = logging.getLogger(__name__)


@dataclass
class SvrState:
    """The voxel volume and its grid after the cycles."""

    volume: Tensor  # [I, J, K] normalised intensities
    grid: VoxelGrid


@torch.no_grad()
def psf_quadrature(data: SliceData, motion: SliceMotion, s: SvrSettings, pixels: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The slice PSF's Gauss-Hermite quadrature (``s.psf_normal`` nodes through the slice, ``s.psf_inplane`` per in-plane
    axis) for the chosen pixels at the current motion: their slices [p], their centres [p, 3] (mm), each slice's node
    offsets [M, S, 3] (mm) and the node weights [S] (summing to 1). Pixel i integrates V at x[i] + offsets[slices[i]]."""
    nodes, node_w = psf_nodes(s.psf_normal, s.psf_inplane, data.x0.device)
    sid = data.slice_idx[pixels]
    rot = motion.rotation()
    x = transform_points(data.x0[pixels], sid, data.centre, rot, motion.trans)
    return sid, x, psf_offsets(rot @ data.axes, data.psf_sigma, nodes), node_w


class SliceOperator:
    """Acquisition of the chosen in-mask pixels for fixed motion (chunked).

    With ``matrix`` (for solves that apply it many times) the operator and its transpose are built once as sparse
    matrices (:func:`gsvr.ops.voxel.acquisition_matrices`); otherwise each application interpolates again."""

    def __init__(self, data: SliceData, motion: SliceMotion, grid: VoxelGrid, s: SvrSettings, pixels: Tensor, *,
                 matrix: bool = False) -> None:
        self.grid, self.s = grid, s
        self.sid, self.x, self.off, self.node_w = psf_quadrature(data, motion, s, pixels)
        self.a = self.a_t = None
        if matrix:
            self.a, self.a_t = acquisition_matrices(grid, self.x, self.off[self.sid], self.node_w, chunk=s.chunk_pixels)

    def forward(self, volume: Tensor) -> Tensor:
        if self.a is not None:
            return torch.mv(self.a, volume.reshape(-1))
        return torch.cat([acquire(volume, self.grid, self.x[c], self.off[self.sid[c]], self.node_w)
                          for c in _chunks(len(self.x), self.s.chunk_pixels)])

    def adjoint(self, values: Tensor) -> Tensor:
        if self.a_t is not None:
            return torch.mv(self.a_t, values).reshape(self.grid.shape)
        out = torch.zeros(self.grid.shape, device=values.device)
        for c in _chunks(len(self.x), self.s.chunk_pixels):
            out += acquire_adjoint(values[c], self.grid, self.x[c], self.off[self.sid[c]], self.node_w)
        return out


def _grad_penalty_normal(v: Tensor, edge_weights: list[Tensor] | None = None) -> Tensor:
    """G^T D G v for forward differences G along the three axes (Neumann boundary); D holds one weight
    per difference (``edge_weights[d]``, the shape of ``diff(v, dim=d)``), the identity when None."""
    out = torch.zeros_like(v)
    for d in range(3):
        diff = torch.diff(v, dim=d)
        if edge_weights is not None:
            diff = diff * edge_weights[d]
        out += torch.nn.functional.pad(diff, _pad(d, 1, 0)) - torch.nn.functional.pad(diff, _pad(d, 0, 1))
    return out


def edge_weights(v: Tensor, spacing_mm: float, delta: float) -> list[Tensor]:
    """Edge-preserving weights 1 / sqrt(1 + (|dv/dx| / delta)^2) of every forward difference (per mm),
    the lagged-diffusivity linearisation of a Charbonnier (smoothed total-variation) prior."""
    return [torch.rsqrt(1 + (torch.diff(v, dim=d) / (spacing_mm * delta)).square()) for d in range(3)]


def _pad(dim: int, before: int, after: int) -> list[int]:
    """F.pad spec padding axis ``dim`` of a 3D tensor."""
    spec = [0, 0, 0, 0, 0, 0]
    spec[2 * (2 - dim)] = before
    spec[2 * (2 - dim) + 1] = after
    return spec


def super_resolve(data: SliceData, motion: SliceMotion, pixel_weight: Tensor, grid: VoxelGrid, s: SvrSettings, *,
                  pixels: Tensor | None = None, init: Tensor | None = None, operator: SliceOperator | None = None) -> Tensor:
    """Weighted Tikhonov least squares by conjugate gradients: (A^T W A + lam G^T G) v = A^T W y.

    A includes each slice's intensity scale. ``pixel_weight`` [P] is W (slice weight x pixel weight);
    ``pixels`` (indices) restricts the data term to a subset of the pixels. ``operator``: A for those pixels, this
    motion and this grid, built by the caller (to share it between solves at the same motion); built here when None.
    """
    if pixels is None:
        pixels = torch.arange(data.n_pixels, device=data.x0.device)
    op = SliceOperator(data, motion, grid, s, pixels, matrix=True) if operator is None else operator
    if len(op.x) != len(pixels) or op.grid != grid:
        raise ValueError(f"super_resolve: the operator is for {len(op.x)} pixels on {op.grid}, the solve for "
                         f"{len(pixels)} on {grid}")
    scale = torch.exp(motion.log_scale.detach())[op.sid]
    pixel_weight = pixel_weight[pixels]
    w = pixel_weight * scale.square()

    edges = None

    def normal(v: Tensor) -> Tensor:
        return op.adjoint(w * op.forward(v)) + lam * _grad_penalty_normal(v, edges)

    # lam relative to the mean diagonal of A^T W A over covered voxels, so it does not depend on the grid.
    diag = op.adjoint(w * op.forward(torch.ones(grid.shape, device=data.x0.device)))
    lam = s.tikhonov * float(diag[diag > 1e-6 * diag.max()].mean())
    b = op.adjoint(pixel_weight * scale * data.y[pixels])
    v = torch.zeros(grid.shape, device=data.x0.device) if init is None else init.clone()
    v = _conjugate_gradients(normal, b, v, s.cg_iterations)
    if s.prior == "edge":  # lagged diffusivity: weights from the Tikhonov solution, then solve again from it
        edges = edge_weights(v, grid.spacing_mm, s.edge_delta)
        v = _conjugate_gradients(normal, b, v, s.cg_iterations)
    return v


def holdout_pixels(n_pixels: int, fraction: float, device: torch.device | str = "cpu") -> Tensor:
    """[P] bool: a fixed ``fraction`` of the pixels, chosen by a multiplicative hash of the pixel index (the same
    pixels in every run; spread over every slice)."""
    idx = torch.arange(n_pixels, device=device, dtype=torch.int64)
    return (idx * 2654435761) % 2**32 < int(fraction * 2**32)


def step_sample(n: int, count: int, step: int, device: torch.device | str = "cpu") -> Tensor | None:
    """The ``count`` of ``n`` items (pixels, voxels) one optimisation step uses: None (all) when ``count`` is ``n``,
    else a permutation drawn from the step number alone, so a resumed run draws the same ones."""
    if count == n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(step))[:count].to(device)


def select_tikhonov(data: SliceData, motion: SliceMotion, pixel_weight: Tensor, grid: VoxelGrid, s: SvrSettings,
                    factors: Sequence[float], *, fraction: float = 0.1, operator: SliceOperator | None = None
                    ) -> tuple[float, Tensor, list[tuple[float, float]]]:
    """The gradient penalty, among ``s.tikhonov`` times each of ``factors``, whose super-resolution from the pixels
    outside :func:`holdout_pixels` predicts the held-out pixels best (weighted squared error, the slices' intensity
    scales applied): self-supervised validation of the regularisation strength.

    The solves run from the most to the least regularised, each warm-started from the last (with half of
    ``s.cg_iterations``, the first with all of them). They apply the operator of all pixels (``operator``, built here
    when None), the held-out pixels weighted zero: the solve from all pixels that follows shares it. Returns the chosen
    penalty, its volume (from the training pixels: a warm start for the solve from all of them) and the
    (factor, held-out error) of every factor.
    """
    dev = data.x0.device
    held = holdout_pixels(data.n_pixels, fraction, dev)
    test = torch.nonzero(held)[:, 0]
    if operator is None:
        operator = SliceOperator(data, motion, grid, s, torch.arange(data.n_pixels, device=dev), matrix=True)
    op = SliceOperator(data, motion, grid, s, test)
    scale = torch.exp(motion.log_scale.detach())[op.sid]
    w = pixel_weight[test]
    train_weight = torch.where(held, torch.zeros_like(pixel_weight), pixel_weight)
    v, best, errors = None, None, []
    for factor in sorted(factors, reverse=True):
        iterations = s.cg_iterations if v is None else max(s.cg_iterations // 2, 1)
        v = super_resolve(data, motion, train_weight, grid,
                          dataclasses.replace(s, tikhonov=s.tikhonov * factor, cg_iterations=iterations), init=v,
                          operator=operator)
        r = scale * op.forward(v) - data.y[test]
        err = float((w * r * r).sum() / w.sum().clamp_min(1e-12))
        errors.append((factor, err))
        if best is None or err < best[1]:
            best = (factor, err, v.clone())
    return s.tikhonov * best[0], best[2], errors


def output_super_resolution(data: SliceData, motion: SliceMotion, pixel_weight: Tensor, s: SvrSettings, resolution_mm: float,
                            radius_mm: float) -> SvrState:
    """The super-resolution on the output grid (covering the pixels plus ``radius_mm``; zero beyond ``radius_mm`` of
    them) with the final motions, scales and weights.

    The gradient penalty keeps the physical smoothness of the last cycle (the relative penalty grows as
    1/spacing^2), times the factor of ``s.output_tikhonov_factors`` chosen on held-out pixels
    (:func:`select_tikhonov`, whose first solve runs twice the cycles' CG iterations); the solve from all pixels
    then runs the cycles' iterations from the chosen volume (twice them from zero when the factors are null).
    """
    grid, covered = output_support(data, motion, resolution_mm, radius_mm)
    tikhonov = s.tikhonov * (s.spacings_mm[-1] / resolution_mm) ** 2
    final = dataclasses.replace(s, cg_iterations=2 * s.cg_iterations, tikhonov=tikhonov)
    start = None
    op = SliceOperator(data, motion, grid, s, torch.arange(data.n_pixels, device=data.x0.device), matrix=True)
    if s.output_tikhonov_factors is not None:
        lam, start, errors = select_tikhonov(data, motion, pixel_weight, grid, final, s.output_tikhonov_factors,
                                             operator=op)
        log.info("output super-resolution at %.2f mm: held-out error %s; gradient penalty x%g", resolution_mm,
                 ", ".join(f"x{f:g} {e:.3g}" for f, e in errors), lam / tikhonov)
        final = dataclasses.replace(final, tikhonov=lam, cg_iterations=s.cg_iterations)
    vol = super_resolve(data, motion, pixel_weight, grid, final, init=start, operator=op)
    return SvrState(torch.where(covered, vol, torch.zeros_like(vol)), grid)


@torch.no_grad()
def output_support(data: SliceData, motion: SliceMotion, resolution_mm: float, radius_mm: float) -> tuple[VoxelGrid, Tensor]:
    """The output grid covering the pixels at ``motion`` plus ``radius_mm``, and its support [I, J, K] (the voxels within
    ``radius_mm`` of a pixel), as the sample stage builds them from the final motions."""
    x = current_positions(data, motion)
    grid = VoxelGrid.covering(x, resolution_mm, radius_mm)
    return grid, support_mask(grid, x, radius_mm)


def _conjugate_gradients(normal, b: Tensor, v: Tensor, iterations: int) -> Tensor:
    """``iterations`` conjugate-gradient steps on normal(v) = b from ``v`` (updated in place)."""
    r = b - normal(v)
    p = r.clone()
    rr = (r * r).sum()
    for _ in range(iterations):
        ap = normal(p)
        alpha = rr / (p * ap).sum().clamp_min(1e-30)
        v += alpha * p
        r -= alpha * ap
        rr_new = (r * r).sum()
        p = r + (rr_new / rr.clamp_min(1e-30)) * p
        rr = rr_new
    return v


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, start + size)


def svr_cycles(data: SliceData, motion: SliceMotion, s: SvrSettings, *, weight_fn, output_mm: float, radius_mm: float,
               progress=None, start_cycle: int = 0, weights: Tensor | None = None, pixel_weights: Tensor | None = None,
               on_cycle=None) -> tuple[SvrState, Tensor, Tensor]:
    """Run the coarse-to-fine cycles, updating ``motion`` in place; returns the final volume and slice weights.

    With ``leave_one_out`` (and at least two stacks) the slices of each stack are registered to a
    volume reconstructed from the *other* stacks only, so a slice cannot lock onto its own
    imprint in the volume; orthogonal stacks give that volume its resolution exactly along the
    held-out slices' in-plane axes.

    With ``output_registration`` (and leave-one-out) a last cycle registers each stack's slices to the
    super-resolution of the other stacks on the output grid (``output_mm``, zero beyond ``radius_mm`` of the pixels),
    its gradient penalty chosen on held-out pixels as the output solve's is (:func:`output_super_resolution`).

    Returns the volume, the slice weights [M] and the pixel weights [P] (ones unless ``robust="em"``);
    the super-resolution weights a pixel by their product.

    Args:
        weight_fn: maps the per-slice mean absolute residual [M] to slice weights [M] (``robust="slice"``).
        output_mm, radius_mm: the output grid's spacing and support radius (the last cycle's volume).
        progress: optional callable(cycle, median_ncc) told when each cycle ends.
        start_cycle, weights, pixel_weights: resume after ``start_cycle`` cycles, with the weights they left.
        on_cycle: optional callable(cycles_done, weights, pixel_weights) after each cycle (checkpoints).
    """
    dev = data.x0.device
    stack_of = torch.as_tensor(data.stack_of_slice, device=dev)
    stacks = torch.unique(stack_of)
    loo = s.leave_one_out and len(stacks) > 1
    weights = torch.ones(data.n_slices, device=dev) if weights is None else weights
    pixel_weights = torch.ones(data.n_pixels, device=dev) if pixel_weights is None else pixel_weights
    stack_cycles = s.n_cycles(len(stacks)) - len(s.spacings_mm)
    schedule = list(s.stack_spacings_mm[:stack_cycles]) + list(s.spacings_mm)
    on_output = len(schedule)  # the cycle on the output grid, when there is one
    schedule += [output_mm] * (s.n_cycles(len(stacks)) - len(schedule))
    for cycle, spacing in enumerate(schedule):
        if cycle < start_cycle:
            continue
        whole_stacks = cycle < stack_cycles
        grid = _grid(data, motion, spacing, s.margin_mm)
        mean_res = torch.zeros(data.n_slices, device=dev)
        pixel_res = torch.zeros(data.n_pixels, device=dev)
        ncc = torch.zeros(data.n_slices, device=dev)
        groups = [stack_of == k for k in stacks] if loo else [torch.ones_like(stack_of, dtype=torch.bool)]
        for held_out in groups:
            fit_slices = ~held_out if loo else held_out
            fit_pixels = torch.nonzero(fit_slices[data.slice_idx])[:, 0]
            if cycle == on_output:
                out = output_super_resolution(data, motion, weights[data.slice_idx] * pixel_weights * fit_slices[data.slice_idx],
                                              s, output_mm, radius_mm)
                vol, grid = out.volume, out.grid
            else:
                vol = super_resolve(data, motion, weights[data.slice_idx] * pixel_weights, grid, s, pixels=fit_pixels)
            ncc_k = register(vol, grid, data, motion, s, slices=held_out, groups=stack_of if whole_stacks else None,
                             rotate=whole_stacks or cycle - stack_cycles >= s.translation_only_cycles)
            ncc[held_out] = ncc_k[held_out]
            mean_res[held_out] = fit_scales_and_residuals(vol, grid, data, motion, s, held_out, pixel_res)[held_out]
        if s.robust == "em":
            pixel_weights, weights = em_robust_weights(pixel_res, data.slice_idx, data.n_slices, s.em_iterations)
        else:
            weights = weight_fn(mean_res)
        if s.scale_outlier_z is not None:
            weights = weights * scale_outlier_weights(motion.log_scale.detach(), s.scale_outlier_z)
        if s.ncc_outlier_z is not None and not whole_stacks and loo:
            weights = weights * ncc_outlier_weights(ncc, s.ncc_outlier_z)
        remove_global_motion(data, motion)
        log.info("svr cycle %d (%.1f mm%s, %s): median slice NCC %.3f", cycle + 1, spacing,
                 ", output grid" if cycle == on_output else "", "whole stacks" if whole_stacks else "slices",
                 float(ncc.median()))
        if progress is not None:
            progress(cycle, float(ncc.median()))
        if on_cycle is not None:
            on_cycle(cycle + 1, weights, pixel_weights)
    grid = _grid(data, motion, s.spacings_mm[-1], s.margin_mm)
    vol = super_resolve(data, motion, weights[data.slice_idx] * pixel_weights, grid, s)
    return SvrState(vol, grid), weights, pixel_weights


def robust_outlier_weights(x: Tensor, z_scale: float, floor: float, side: str) -> Tensor:
    """[M] weights exp(-1/2 (z / z_scale)^2) of a robust z-score of ``x`` [M]: z = d / max(1.4826 MAD, floor) with
    d = x - median (``side="above"``: only values above the median lose weight), median - x (``"below"``) or
    |x - median| (``"both"``)."""
    med = x.median()
    spread = torch.clamp(1.4826 * (x - med).abs().median(), min=floor)
    dev = {"above": x - med, "below": med - x, "both": (x - med).abs()}[side]
    return torch.exp(-0.5 * (dev.clamp_min(0) / spread / z_scale).square())


def scale_outlier_weights(log_scale: Tensor, z_scale: float, floor: float = 0.05) -> Tensor:
    """[M] weights of the slices' robust z-score of log intensity scale, both ways (see SvrSettings)."""
    return robust_outlier_weights(log_scale, z_scale, floor, "both")


def ncc_outlier_weights(ncc: Tensor, z_scale: float, floor: float = 0.005) -> Tensor:
    """[M] weights of the slices' robust z-score of registration NCC, only a fit worse than the other slices'
    counting (see SvrSettings)."""
    return robust_outlier_weights(ncc, z_scale, floor, "below")


@torch.no_grad()
def em_robust_weights(residuals: Tensor, sid: Tensor, n_slices: int, iterations: int = 10) -> tuple[Tensor, Tensor]:
    """Robust statistics of Kuklisova-Murgasova et al. (2012): pixel and slice inlier posteriors.

    Pixels: residual e ~ c N(0, sigma^2) + (1 - c) U(range of e), fitted by EM; p = posterior of the
    Gaussian. Slices: potential sqrt(mean over the slice of (1 - p)^2), modelled as an inlier
    Gaussian against outliers uniform on [0, 1], fitted by EM; the slice weight is the inlier
    posterior, 1 below the inlier mean. Returns (pixel posteriors [P], slice weights [M]).
    """
    e = residuals.double()
    m_uniform = 1.0 / float((e.max() - e.min()).clamp_min(1e-12))
    mad = (e - e.median()).abs().median()
    sigma2 = float((1.4826 * mad).clamp_min(1e-6)) ** 2
    c = 0.9
    for _ in range(iterations):
        g = torch.exp(-0.5 * e.square() / sigma2) / math.sqrt(2 * math.pi * sigma2)
        p = c * g / (c * g + (1 - c) * m_uniform)
        sigma2 = max(float((p * e.square()).sum() / p.sum().clamp_min(1e-12)), 1e-12)
        c = float(p.mean().clamp(1e-3, 1 - 1e-3))
    n = torch.bincount(sid, minlength=n_slices).double().clamp_min(1)
    potential = (torch.zeros(n_slices, dtype=e.dtype, device=e.device).index_add(0, sid, (1 - p).square()) / n).sqrt()
    # Slices: inlier Gaussian of the potentials (started from their median and MAD) against outliers
    # uniform on [0, 1], the range of a potential. (A second Gaussian, as in SVRTK, splits even a
    # clean, unimodal set of potentials in two and down-weights clean slices: docs/results.md.)
    mu = float(potential.median())
    var = max(float(1.4826 * (potential - mu).abs().median()) ** 2, 1e-6)
    mix = 0.9
    for _ in range(iterations):
        g = mix * torch.exp(-0.5 * (potential - mu) ** 2 / var) / math.sqrt(2 * math.pi * var)
        post = g / (g + (1 - mix))
        w = post.sum().clamp_min(1e-12)
        mu = float((post * potential).sum() / w)
        var = max(float((post * (potential - mu).square()).sum() / w), 1e-6)
        mix = float(post.mean().clamp(0.5, 1 - 1e-3))  # outliers never the majority
    slice_w = torch.where(potential <= mu, torch.ones_like(post), post)
    return p.float(), slice_w.float()


@torch.no_grad()
def within_radius(points_mm: Tensor, queries_mm: Tensor, radius_mm: float) -> Tensor:
    """[Q] bool: queries [Q, 3] within ``radius_mm`` of some point of ``points_mm`` [P, 3]."""
    queries_mm = queries_mm.to(points_mm.device)
    near = knn(points_mm, queries_mm, 1, backend="auto")[:, 0]
    return (queries_mm - points_mm[near]).norm(dim=-1) <= radius_mm


@torch.no_grad()
def support_mask(grid: VoxelGrid, points_mm: Tensor, radius_mm: float) -> Tensor:
    """[I, J, K] bool: voxels within ``radius_mm`` of some point of ``points_mm`` [P, 3] (the in-mask pixels).

    Every point lies within s = h sqrt(3) / 2 of the centre of the voxel it rounds to, so a voxel whose distance
    (Euclidean distance transform) to the nearest such voxel is at most radius - s is within the radius, and one
    farther than radius + s is not: only the shell between is decided by a nearest-neighbour query."""
    if len(points_mm) == 0:
        return torch.zeros(grid.shape, dtype=torch.bool, device=points_mm.device)
    pts = grid.points(points_mm.device)
    ijk = torch.round((points_mm - torch.tensor(grid.corner_mm, device=points_mm.device)) / grid.spacing_mm).long()
    if not bool(((ijk >= 0) & (ijk < torch.tensor(grid.shape, device=ijk.device))).all()):  # points off the grid
        return within_radius(points_mm, pts.reshape(-1, 3), radius_mm).reshape(grid.shape)
    empty = np.ones(grid.shape, dtype=bool)  # False at the voxels holding a point (the transform's zeros)
    empty[tuple(ijk.cpu().numpy().T)] = False
    dist = torch.from_numpy(ndimage.distance_transform_edt(empty, sampling=grid.spacing_mm)).float().to(points_mm.device)
    slack = grid.spacing_mm * math.sqrt(3) / 2 + 1e-4  # (+ 0.1 um: float32 rounding of the coordinates)
    out = dist <= radius_mm - slack
    shell = (dist <= radius_mm + slack) & ~out
    out[shell] = within_radius(points_mm, pts[shell], radius_mm)
    return out


@torch.no_grad()
def remove_global_motion(data: SliceData, motion: SliceMotion) -> None:
    """Take out the rigid transform G that best maps the header pixel positions onto the corrected
    ones (Kabsch), so the volume stays in the scanner frame: new motion = G^-1 o motion."""
    x = transform_points(data.x0, data.slice_idx, data.centre, motion.rotation(), motion.trans).double()
    x0 = data.x0.double()
    mx, m0 = x.mean(0), x0.mean(0)
    u, _, vt = torch.linalg.svd((x - mx).T @ (x0 - m0))
    d = torch.sign(torch.linalg.det(u @ vt))
    g_rot = u @ torch.diag(torch.stack([d.new_tensor(1.0), d.new_tensor(1.0), d])) @ vt  # x - mx ~ g_rot (x0 - m0)
    g_t = mx - g_rot @ m0
    rot = g_rot.T @ motion.rotation().double()
    centre = data.centre.double()
    trans = (centre + motion.trans.double() - g_t) @ g_rot - centre
    motion.rotvec.copy_(matrix_to_axis_angle(rot).float())
    motion.trans.copy_(trans.float())


def _grid(data: SliceData, motion: SliceMotion, spacing_mm: float, margin_mm: float) -> VoxelGrid:
    return VoxelGrid.covering(current_positions(data, motion), spacing_mm, margin_mm)


@torch.no_grad()
def fit_scales_and_residuals(vol: Tensor, grid: VoxelGrid, data: SliceData, motion: SliceMotion, s: SvrSettings,
                             slices: Tensor, pixel_residuals: Tensor | None = None) -> Tensor:
    """Least-squares intensity scale of the chosen slices (y ~ scale * A_i V) into ``motion.log_scale``;
    returns every slice's mean absolute residual [M] (0 for slices not chosen) and writes the chosen
    pixels' signed residuals into ``pixel_residuals`` [P] when given."""
    m = data.n_slices
    pixels = torch.nonzero(slices[data.slice_idx])[:, 0]
    op = SliceOperator(data, motion, grid, s, pixels)
    pred = op.forward(vol)
    y = data.y[pixels]
    py = torch.zeros(m, device=y.device).index_add(0, op.sid, pred * y)
    pp = torch.zeros(m, device=y.device).index_add(0, op.sid, pred * pred)
    scale = (py / pp.clamp_min(1e-12)).clamp(s.scale_bounds[0], s.scale_bounds[1])
    motion.log_scale[slices] = scale.log()[slices]
    res = pred * scale[op.sid] - y
    if pixel_residuals is not None:
        pixel_residuals[pixels] = res
    n = torch.bincount(op.sid, minlength=m).clamp_min(1)
    return torch.zeros(m, device=y.device).index_add(0, op.sid, res.abs()) / n
