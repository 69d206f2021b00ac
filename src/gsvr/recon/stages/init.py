"""Stage init: the initial Gaussians, content-adaptive from the SVR volume (or on M-Gaussian's grid), or from
the slice pixels when there is no SVR volume; restored from a fit or joint checkpoint when resuming."""

from __future__ import annotations

import logging

import torch

from gsvr.model.field import GaussianField, content_adaptive_init
from gsvr.model.grid import GaussianGrid
from gsvr.ops.voxel import VoxelGrid
from gsvr.recon.config import InitConfig, ModelConfig
from gsvr.recon.forward import current_positions
from gsvr.recon.slices import SliceData, SliceMotion
from gsvr.recon.state import ProgressiveGrid, ReconState, support_radius
from gsvr.recon.strategies.progressive import near
from gsvr.recon.svr import SvrState, support_mask

NAME = "init"
log = logging.getLogger(__name__)


def run(state: ReconState, cfg: InitConfig) -> ReconState:
    ck, device, full, k = state.ck, state.device, state.cfg, state.k
    progressive = full.joint.progressive
    fit_state = ck.resumes("fit")
    if state.svr is None and fit_state:  # the SVR cycles ended before the checkpoint: their volume is in it
        state.svr = SvrState(fit_state["svr_volume"].to(device), VoxelGrid(*fit_state["svr_grid"]))
        state.pixel_weights = fit_state["pixel_weights"].to(device)
    n = min(cfg.n_gaussians, state.data.n_pixels)
    if ck.skips("fit"):  # a joint checkpoint
        state.field = GaussianField.from_state(ck.loaded["field"], device)
        if progressive:
            corner, spacing, shape, active = ck.loaded["progressive_grid"]
            state.progressive = ProgressiveGrid(GaussianGrid(VoxelGrid(corner, spacing, shape), active),
                                                ck.loaded["progressive_radius"])
    elif state.svr is not None and cfg.from_svr:
        x_now = current_positions(state.data, state.motion)
        radius = support_radius(state.stacks)
        state.covered = support_mask(state.svr.grid, x_now, radius)
        if progressive:
            state.progressive = ProgressiveGrid(GaussianGrid.inside(state.svr.grid, progressive.spacings_mm[0],
                                                                    near(x_now, radius)), radius)
        if fit_state:
            state.field = GaussianField.from_state(fit_state["field"], device)
        elif progressive:
            state.field = field_on_grid(state.svr, state.progressive.grid, full.model, progressive.grid_scale, k=k)
            log.info("progressive grid: %d Gaussians at %.2f mm", state.field.n, progressive.spacings_mm[0])
        else:
            state.field = field_from_volume(state.svr, state.covered, cfg, full.model, state.gen, n=n, k=k)
    else:
        state.field = field_from_slices(state.data, state.motion, cfg, full.model, state.gen, n=n, k=k)
    return state


def field_from_slices(data: SliceData, motion: SliceMotion, cfg: InitConfig, model: ModelConfig, gen: torch.Generator, *,
                      n: int, k: int) -> GaussianField:
    """Content-adaptive (or uniform) initialisation at the current motion-corrected pixel positions."""
    x = current_positions(data, motion)
    return content_adaptive_init(
        x, data.y, data.grad_mag if cfg.adaptive else torch.ones_like(data.grad_mag), data.jitter_mm,
        n=n, lambda_init=cfg.lambda_init if cfg.adaptive else 1.0, mode=model.render_mode, k=min(k, n),
        scale_bounds_mm=(cfg.scale_min_mm, cfg.scale_max_mm), generator=gen, knn_backend=model.knn_backend,
        intensity=model.intensity,
    )


def field_from_volume(svr: SvrState, covered: torch.Tensor, cfg: InitConfig, model: ModelConfig, gen: torch.Generator, *,
                      n: int, k: int) -> GaussianField:
    """Content-adaptive initialisation from the SVR volume: means drawn among the ``covered`` [I, J, K]
    voxels (probability from the volume's gradient magnitude), intensities read from the volume."""
    grad = torch.stack(torch.gradient(svr.volume, spacing=svr.grid.spacing_mm)).norm(dim=0)
    pts = svr.grid.points(svr.volume.device)[covered]
    half = torch.full_like(pts, 0.5 * svr.grid.spacing_mm)
    return content_adaptive_init(
        pts, svr.volume[covered], grad[covered] if cfg.adaptive else torch.ones_like(pts[:, 0]), half,
        n=min(n, len(pts)), lambda_init=cfg.lambda_init if cfg.adaptive else 1.0, mode=model.render_mode, k=min(k, n),
        scale_bounds_mm=(cfg.scale_min_mm, cfg.scale_max_mm), generator=gen, knn_backend=model.knn_backend,
        intensity=model.intensity,
    )


def field_on_grid(svr: SvrState, grid: GaussianGrid, model: ModelConfig, grid_scale: float, *, k: int) -> GaussianField:
    """Isotropic Gaussians on the nodes of ``grid`` with the SVR volume's intensities, divided (exact
    mode) by the overlap of the neighbouring Gaussians so the field starts near the volume."""
    pos = grid.positions(svr.volume.device)
    coords = svr.grid.normalised(pos)[None, :, None, None, :]
    values = torch.nn.functional.grid_sample(svr.volume[None, None], coords, align_corners=True)[0, 0, :, 0, 0]
    if model.render_mode == "exact":
        ones = grid.field(torch.ones_like(values), scale_factor=grid_scale, mode=model.render_mode)
        values = values / ones.sample(pos, k=min(k, ones.n), knn_backend=model.knn_backend).clamp_min(1e-6)
    return grid.field(values.clone(), scale_factor=grid_scale, mode=model.render_mode, intensity=model.intensity)
