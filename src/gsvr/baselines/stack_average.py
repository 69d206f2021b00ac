"""``stack_average``: the floor every SVR method must beat.

Each stack, cropped and standardised as for the other methods, is resampled (linear, SimpleITK) in
its header geometry onto the isotropic output grid covering the masks; the volume is the mean of the
stacks that cover each voxel. No PSF, no motion correction, no super-resolution.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch

from gsvr.evaluate.metrics import to_sitk
from gsvr.io.nifti import Stack
from gsvr.recon.config import ReconConfig
from gsvr.recon.engine import HISTORY_COLUMNS, Result, prepare_stacks
from gsvr.recon.state import slice_table
from gsvr.recon.slices import SliceMotion, build_slice_data
from gsvr.recon.volume import SampledVolume, output_grid


def reconstruct_stack_average(stacks: Sequence[Stack], config: ReconConfig | None = None, *, progress: bool = True) -> Result:
    """Mean of the stacks resampled onto the output grid (``output.resolution_mm``) in header geometry."""
    cfg = config or ReconConfig()
    t_start = time.perf_counter()
    stacks = prepare_stacks(stacks, dataclasses.replace(cfg, align=None))
    points = np.concatenate([np.argwhere(s.mask) @ s.affine[:3, :3].T + s.affine[:3, 3] for s in stacks])
    shape, affine = output_grid(points, cfg.output.resolution_mm, margin_mm=float(max(s.thickness_mm for s in stacks)))
    reference = to_sitk(np.zeros(shape, dtype=np.float32), affine)
    total = np.zeros(shape, dtype=np.float64)
    count = np.zeros(shape, dtype=np.float64)
    for s in stacks:
        for image, acc in ((s.data, total), (np.ones_like(s.data), count)):
            out = sitk.Resample(to_sitk(image, s.affine), reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            acc += np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))
    volume = np.where(count > 0.5, total / np.maximum(count, 1e-6), 0.0).astype(np.float32)
    data = build_slice_data(stacks, quantile=cfg.preprocess.normalize_quantile, device=torch.device("cpu"))
    slices = slice_table(data, SliceMotion(data.n_slices, torch.device("cpu")), torch.ones(data.n_slices), stacks)
    return Result(volume=SampledVolume(volume, affine), slices=slices, history=pd.DataFrame(columns=HISTORY_COLUMNS),
                  model={}, config=cfg, elapsed_s=time.perf_counter() - t_start)
