"""Stage fit: all Gaussian parameters fitted to the SVR volume at its covered voxels (L1, Adam; each step on a
fresh ``fit.voxel_fraction`` of them),
so the rendered field starts at the SVR volume's quality. Checkpointed every ``run.checkpoint_every`` steps."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from gsvr.model.field import GaussianField
from gsvr.ops.gaussians import gaussian_sum_packed, pack_tables, pair_tables
from gsvr.ops.knn import knn
from gsvr.recon.config import FitConfig, ModelConfig
from gsvr.recon.state import ReconState, log_peak_memory
from gsvr.recon.svr import SvrState, step_sample

NAME = "fit"


def run(state: ReconState, cfg: FitConfig | None) -> ReconState:
    if state.covered is None:  # initialised from the slices, or resumed after the fit
        return state
    if cfg is not None:
        svr, resumed = state.svr, state.ck.resumes(NAME)
        grid = svr.grid

        def step_done(step: int, loss: float, optimizer) -> None:
            state.record(NAME, loss)
            state.bar.update(1)
            state.bar.set_postfix_str(f"fit to SVR volume, loss {loss:.4f}")
            if state.ck.due(step):
                state.save(NAME, step, field=state.field.state(), optimizer=optimizer.state_dict(),
                           svr_volume=svr.volume.cpu(), svr_grid=(grid.corner_mm, grid.spacing_mm, grid.shape),
                           pixel_weights=state.pixel_weights.cpu())

        fit_to_volume(state.field, svr, state.covered, cfg, state.cfg.model, k=state.k, on_step=step_done,
                      start=resumed["step"] if resumed else 0, optimizer_state=resumed["optimizer"] if resumed else None)
    log_peak_memory("the fit to the SVR volume")
    return state


def fit_to_volume(field: GaussianField, svr: SvrState, covered: Tensor, cfg: FitConfig, model: ModelConfig, *, k: int,
                  on_step: Callable[[int, float, torch.optim.Optimizer], None] | None = None, start: int = 0,
                  optimizer_state: dict | None = None) -> None:
    """Fit ``field`` to the SVR volume at its ``covered`` [I, J, K] voxels for steps ``start`` .. ``cfg.steps``.

    ``on_step(step, loss, optimizer)`` is called after each step with the number of steps done."""
    pts = svr.grid.points(svr.volume.device)[covered]
    target = svr.volume[covered]
    k = min(k, field.n)
    optimizer = torch.optim.Adam(field.param_groups(cfg.lr))
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    ids = torch.arange(field.n, device=pts.device)
    n_step = max(1, round(cfg.voxel_fraction * len(pts)))
    for it in range(start, cfg.steps):
        if it % model.knn_every == 0:
            nbr = knn(field.means.detach(), pts, k, backend=model.knn_backend)
        step_idx = step_sample(len(pts), n_step, it, pts.device)
        optimizer.zero_grad(set_to_none=True)
        tables = pair_tables(field.means, field.log_scales, field.quats, field.intensities, None, ids, ids, mode=model.render_mode)
        packed = pack_tables(tables)
        leaf = packed.detach().requires_grad_(True)
        loss_value = 0.0
        for lo in range(0, n_step, model.chunk_pixels):
            sel = slice(lo, lo + model.chunk_pixels) if step_idx is None else step_idx[lo : lo + model.chunk_pixels]
            pred = gaussian_sum_packed(pts[sel], nbr[sel], leaf, mode=model.render_mode, delta=model.delta)
            loss = (pred - target[sel]).abs().sum() / n_step
            loss.backward()
            loss_value += loss.item()
        packed.backward(leaf.grad)
        optimizer.step()
        if on_step is not None:
            on_step(it + 1, loss_value, optimizer)
