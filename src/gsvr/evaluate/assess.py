"""Self-consistency for data without ground truth: leave one stack out.

For each stack: reconstruct from all the others, register the volume rigidly to the left-out stack
(masked correlation, :func:`gsvr.preprocess.align.register_stack`), simulate the left-out stack's
slices through the slice PSF (Gauss-Hermite quadrature of the volume, trilinear), and compare with
the acquired slices inside the stack's mask:

- ``ncc``: Pearson correlation of simulated and acquired pixels;
- ``psnr``: after a least-squares linear intensity fit of the simulation to the acquisition, with
  the acquisition's in-mask maximum as peak (the ground-truth protocol of :mod:`gsvr.evaluate.metrics`).

The left-out stack keeps its own slice motion, which the stack-level registration cannot remove, so
``ncc``/``psnr`` mix the volume's quality with that motion. ``ncc_slices``/``psnr_slices`` register
every left-out slice to the (fixed) volume first (the Gauss-Newton slice-to-volume registration of
the SVR cycles, 6 parameters per slice against hundreds of pixels): they measure how well the volume
explains new slices. Both are comparable between methods on the same data, not with ground-truth PSNR.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation

from gsvr.errors import GsvrError
from gsvr.io.nifti import Stack
from gsvr.ops.psf import psf_sigmas_mm
from gsvr.ops.voxel import VoxelGrid, psf_nodes
from gsvr.recon.config import ReconConfig, SvrSettings
from gsvr.recon.slices import SliceMotion, build_slice_data, slice_axes
from gsvr.recon.svr import SliceOperator, register

log = logging.getLogger(__name__)

#: Columns of the table :func:`assess_stacks` returns (one row per left-out stack, then the mean).
ASSESS_COLUMNS = ["stack", "ncc", "psnr", "ncc_slices", "psnr_slices", "n_pixels", "registration_rotation_deg", "registration_translation_mm",
                  "reconstruct_s"]


def simulate_stack(volume: np.ndarray, volume_affine: np.ndarray, stack: Stack, transform: np.ndarray | None = None,
                   *, chunk: int = 65536) -> np.ndarray:
    """The in-mask pixels of ``stack`` as the volume would produce them: each pixel is the volume
    integrated against the slice PSF (3x3x3 Gauss-Hermite nodes, trilinear reads, 0 outside).

    Args:
        volume: [I, J, K] voxel values; ``volume_affine`` its voxel -> world affine.
        stack: the stack whose slices are simulated (its header geometry, PSF from spacing and thickness).
        transform: [4, 4] rigid world transform taking volume anatomy onto the stack's (None: identity).

    Returns:
        [P] simulated values, in the order of ``np.argwhere(stack.mask)``.
    """
    ax = slice_axes(stack.affine)
    sp = stack.spacing_mm
    sigma = np.array(psf_sigmas_mm((sp[0], sp[1]), stack.thickness_mm))
    nodes, weights = psf_nodes(3, 3, dtype=torch.float64)
    offsets = (nodes.numpy() * sigma) @ ax.T  # [S, 3] world offsets of the PSF nodes
    to_volume = np.linalg.inv(volume_affine) @ np.linalg.inv(transform if transform is not None else np.eye(4))
    ijk = np.argwhere(stack.mask).astype(np.float64)
    world = ijk @ stack.affine[:3, :3].T + stack.affine[:3, 3]
    vol = torch.as_tensor(np.ascontiguousarray(volume), dtype=torch.float32)[None, None]
    extent = torch.tensor([n - 1 for n in volume.shape], dtype=torch.float64).clamp_min(1)
    out = np.empty(len(ijk), dtype=np.float64)
    for lo in range(0, len(ijk), chunk):
        pts = world[lo:lo + chunk, None, :] + offsets[None]  # [p, S, 3]
        vox = torch.as_tensor(pts @ to_volume[:3, :3].T + to_volume[:3, 3])
        grid = (2.0 * vox / extent - 1.0).flip(-1).float()  # grid_sample wants (k, j, i) in [-1, 1]
        vals = F.grid_sample(vol, grid[None, :, :, None, :], mode="bilinear", padding_mode="zeros", align_corners=True)
        out[lo:lo + chunk] = (vals[0, 0, :, :, 0].double() * weights).sum(-1).numpy()
    return out


def compare_pixels(simulated: np.ndarray, acquired: np.ndarray) -> tuple[float, float]:
    """(NCC, PSNR) of simulated against acquired pixels (PSNR after a linear intensity fit)."""
    if simulated.std() == 0 or acquired.std() == 0:
        return 0.0, float("nan")
    ncc = float(np.corrcoef(simulated, acquired)[0, 1])
    design = np.stack([simulated, np.ones_like(simulated)], 1)
    (a, b), *_ = np.linalg.lstsq(design, acquired, rcond=None)
    mse = float(np.mean((a * simulated + b - acquired) ** 2))
    peak = float(acquired.max())
    return ncc, float(10 * np.log10(peak * peak / max(mse, 1e-30)))


def assess_stacks(stacks: Sequence[Stack], config: ReconConfig | None = None, *, method: str = "gsvr",
                  progress: bool = True) -> pd.DataFrame:
    """Leave-one-stack-out table (``ASSESS_COLUMNS``): one row per stack, then a row ``mean``."""
    from gsvr.recon.files import METHODS

    cfg = config or ReconConfig()
    if len(stacks) < 2:
        raise GsvrError(f"{stacks[0].name if stacks else 'no stack'}: leave-one-stack-out assessment needs at least 2 stacks")
    if method not in METHODS:
        raise GsvrError(f"unknown method {method!r}; known: {sorted(METHODS)}")
    # With stack registration, the volume lives in the reference stack's frame: the left-out stack may
    # be turned as far as the registration allows; without it, frames agree up to residual motion.
    max_angle = cfg.align.max_angle_deg if cfg.align is not None else 0.0
    rows = []
    for i, left_out in enumerate(stacks):
        t0 = time.perf_counter()
        others = [s for j, s in enumerate(stacks) if j != i]
        log.info("assess: reconstructing without %s (%d/%d)", left_out.name, i + 1, len(stacks))
        result = METHODS[method](others, cfg, progress=progress)
        elapsed = time.perf_counter() - t0
        vol = result.volume
        tx = _register(vol.data, vol.affine, left_out, max_angle, cfg.run.seed)
        sim = simulate_stack(vol.data, vol.affine, left_out, tx)
        acquired = left_out.data[left_out.mask].astype(np.float64)
        ncc, psnr = compare_pixels(sim, acquired)
        ncc_s, psnr_s = slice_registered_fit(vol.data, vol.affine, left_out, tx, cfg)
        angle = float(np.degrees(Rotation.from_matrix(tx[:3, :3]).magnitude()))
        rows.append((left_out.name, ncc, psnr, ncc_s, psnr_s, len(acquired), angle, float(np.linalg.norm(tx[:3, 3])), elapsed))
        log.info("assess: %s left out: NCC %.3f, PSNR %.2f dB; slices registered: NCC %.3f, PSNR %.2f dB",
                 left_out.name, ncc, psnr, ncc_s, psnr_s)
    table = pd.DataFrame(rows, columns=ASSESS_COLUMNS)
    mean = table.drop(columns="stack").mean()
    mean["n_pixels"] = table["n_pixels"].sum()
    return pd.concat([table, pd.DataFrame([{"stack": "mean", **mean.to_dict()}])], ignore_index=True)


def assess_files(stacks: Sequence[str], masks: Sequence[str] | None, thicknesses: Sequence[float] | None,
                 config: ReconConfig, *, method: str = "gsvr", output_tsv: str | None = None,
                 progress: bool = True) -> pd.DataFrame:
    """Load the stacks, run :func:`assess_stacks`, write the table (atomically) when asked."""
    from gsvr.io import load_stacks
    from gsvr.io.nifti import atomic_output, check_writable

    if output_tsv:
        check_writable(output_tsv)
    table = assess_stacks(load_stacks(stacks, masks, thicknesses), config, method=method, progress=progress)
    if output_tsv:
        with atomic_output(output_tsv) as tmp:
            table.to_csv(tmp, sep="\t", index=False, float_format="%.5g")
    return table


def slice_registered_fit(volume: np.ndarray, affine: np.ndarray, stack: Stack, transform: np.ndarray,
                         cfg: ReconConfig) -> tuple[float, float]:
    """(NCC, PSNR) of the stack's slices against the volume after slice-to-volume registration of each
    slice (the volume fixed; ``transform`` the stack-level start). The volume must sit on an axis-aligned
    grid (every gsvr reconstruction does)."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.allclose(affine[:3, :3], np.diag(spacing), atol=1e-6) or not np.allclose(spacing, spacing[0]):
        raise GsvrError("slice-level assessment needs an isotropic axis-aligned volume grid")
    moved = Stack(data=stack.data, mask=stack.mask, affine=np.linalg.inv(transform) @ stack.affine,
                  thickness_mm=stack.thickness_mm, name=stack.name)
    dev = torch.device("cpu")
    data = build_slice_data([moved], quantile=cfg.preprocess.normalize_quantile, device=dev)
    grid = VoxelGrid(tuple(float(v) for v in affine[:3, 3] - data.origin_mm), float(spacing[0]), tuple(volume.shape))
    vol = torch.as_tensor(np.ascontiguousarray(volume), dtype=torch.float32)
    vol = vol / vol.abs().max().clamp_min(1e-12)
    motion = SliceMotion(data.n_slices, dev)
    settings = cfg.svr or SvrSettings()
    register(vol, grid, data, motion, settings)
    pred = SliceOperator(data, motion, grid, settings, torch.arange(data.n_pixels)).forward(vol)
    return compare_pixels(pred.double().numpy(), data.y.double().numpy())


def _register(volume: np.ndarray, affine: np.ndarray, stack: Stack, max_angle_deg: float, seed: int) -> np.ndarray:
    """Rigid transform taking the volume's anatomy onto the stack's (world, RAS)."""
    from gsvr.preprocess.align import register_stack

    positive = volume[volume > 0]
    if positive.size == 0:
        raise GsvrError(f"{stack.name}: the reconstruction without this stack is empty")
    support = volume > 0.05 * np.quantile(positive, 0.99)
    spacing = float(np.linalg.norm(affine[:3, 0]))
    as_stack = Stack(data=volume.astype(np.float32), mask=support, affine=affine, thickness_mm=spacing, name="volume")
    transform, _ = register_stack(stack, as_stack, max_angle_deg=max_angle_deg, seed=seed)
    return transform


__all__ = ["ASSESS_COLUMNS", "assess_files", "assess_stacks", "slice_registered_fit", "compare_pixels", "simulate_stack"]
