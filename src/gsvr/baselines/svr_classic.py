"""``svr_classic``: the voxel-grid SVR of :mod:`gsvr.recon.svr` as a method of its own.

The same cycles that initialise the Gaussian engine's motion, then the super-resolution on the output grid
(``output.resolution_mm``) with the final motions, scales and weights, its regularisation chosen on held-out
pixels (:func:`gsvr.recon.svr.output_super_resolution`).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from gsvr.io.nifti import Stack
from gsvr.progress import progress_bar
from gsvr.recon.config import ReconConfig, SvrSettings
from gsvr.recon.engine import HISTORY_COLUMNS, STAGE_MEASURES, Result, deterministic, prepare_stacks, resolve_device
from gsvr.recon.state import slice_table, slice_weight_fn, support_radius
from gsvr.recon.slices import SliceMotion, build_slice_data, set_motion_from_table
from gsvr.recon.svr import output_super_resolution, svr_cycles
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
            _, weights, pixel_weights = svr_cycles(data, motion, settings, weight_fn=weight_fn, progress=tick,
                                                   output_mm=cfg.output.resolution_mm, radius_mm=support_radius(stacks))
        bar.set_postfix_str("super-resolution on the output grid")
        out = output_super_resolution(data, motion, weights[data.slice_idx] * pixel_weights, settings,
                                      cfg.output.resolution_mm, support_radius(stacks))
        vol, grid = out.volume, out.grid
        bar.update(1)
        bar.set_postfix_str("super-resolution")
    data_np = (vol.clamp_min(0) * data.intensity_scale).cpu().numpy().astype(np.float32)
    volume = SampledVolume(data=data_np, affine=grid.affine(data.origin_mm))
    return Result(volume=volume, slices=slice_table(data, motion, weights, stacks),
                  history=pd.DataFrame(history, columns=HISTORY_COLUMNS), model={}, config=cfg,
                  elapsed_s=time.perf_counter() - t_start)
