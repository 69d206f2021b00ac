"""``svr_classic``: the voxel-grid SVR of :mod:`gsvr.recon.svr` as a method of its own.

The same cycles that initialise the Gaussian engine's motion, then one super-resolution solve
on the output grid (``output.resolution_mm``), with the final motions, scales and weights.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from gsvr.io.nifti import Stack
from gsvr.ops.voxel import VoxelGrid
from gsvr.progress import progress_bar
from gsvr.recon.config import ReconConfig, SvrSettings
from gsvr.recon.engine import HISTORY_COLUMNS, STAGE_MEASURES, Result, deterministic, prepare_stacks, resolve_device
from gsvr.recon.state import slice_table, slice_weight_fn, support_radius
from gsvr.recon.slices import SliceMotion, build_slice_data, set_motion_from_table, transform_points
from gsvr.recon.svr import super_resolve, support_mask, svr_cycles
from gsvr.recon.volume import SampledVolume


def reconstruct_classic(stacks: Sequence[Stack], config: ReconConfig | None = None, *, progress: bool = True,
                        initial_motion: pd.DataFrame | None = None) -> Result:
    """Classical SVR: voxel volume, PSF quadrature, CG super-resolution, Gauss-Newton registration.

    ``config.motion=False`` gives the super-resolution of the header geometry, or of ``initial_motion`` (a
    slice table, see :func:`gsvr.recon.engine.reconstruct`) when given, with no motion correction; the
    cycles' settings are ``config.svr`` (its defaults when that section is null).
    """
    with deterministic():
        return _classic(stacks, config or ReconConfig(), progress, initial_motion)


def _classic(stacks: Sequence[Stack], cfg: ReconConfig, progress: bool, initial_motion: pd.DataFrame | None) -> Result:
    t_start = time.perf_counter()
    device = resolve_device(cfg.run.device)
    stacks = prepare_stacks(stacks, cfg)
    torch.manual_seed(cfg.run.seed)
    data = build_slice_data(stacks, quantile=cfg.preprocess.normalize_quantile, device=device)
    motion = SliceMotion(data.n_slices, device)
    if initial_motion is not None:
        set_motion_from_table(data, motion, stacks, initial_motion)
    settings = cfg.svr or SvrSettings()
    weight_fn = slice_weight_fn(cfg)
    n_cycles = settings.n_cycles(len(stacks)) if cfg.motion else 0
    with progress_bar(n_cycles + 1, desc="svr", unit="cycle", progress=progress) as bar:
        history: list[tuple] = []

        def tick(cycle: int, ncc: float) -> None:
            history.append((len(history) + 1, "svr", time.perf_counter() - t_start, ncc, STAGE_MEASURES["svr"]))
            bar.update(1)
            bar.set_postfix_str(f"svr {cycle + 1}/{n_cycles} ncc {ncc:.3f}")

        weights = torch.ones(data.n_slices, device=device)
        pixel_weights = torch.ones(data.n_pixels, device=device)
        if cfg.motion:
            _, weights, pixel_weights = svr_cycles(data, motion, settings, weight_fn=weight_fn, progress=tick)
        with torch.no_grad():
            x = transform_points(data.x0, data.slice_idx, data.centre, motion.rotation(), motion.trans)
        radius = support_radius(stacks)
        resolution = cfg.output.resolution_mm
        grid = VoxelGrid.covering(x, resolution, radius)
        # The output solve keeps the physical smoothness of the last cycle: the relative gradient
        # penalty grows as 1/spacing^2 (the unscaled penalty over-smooths at 0.8 mm: docs/results.md).
        tikhonov = settings.tikhonov * (settings.spacings_mm[-1] / resolution) ** 2
        final = dataclasses.replace(settings, cg_iterations=2 * settings.cg_iterations, tikhonov=tikhonov)
        vol = super_resolve(data, motion, weights[data.slice_idx] * pixel_weights, grid, final)
        vol = torch.where(support_mask(grid, x, radius), vol, torch.zeros_like(vol))
        bar.update(1)
        bar.set_postfix_str("super-resolution")
    data_np = (vol.clamp_min(0) * data.intensity_scale).cpu().numpy().astype(np.float32)
    volume = SampledVolume(data=data_np, affine=grid.affine(data.origin_mm))
    return Result(volume=volume, slices=slice_table(data, motion, weights, stacks),
                  history=pd.DataFrame(history, columns=HISTORY_COLUMNS), model={}, config=cfg,
                  elapsed_s=time.perf_counter() - t_start)
