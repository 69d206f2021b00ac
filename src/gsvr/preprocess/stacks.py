"""Preprocessing of acquired stacks before reconstruction.

Clinical stacks hold the whole maternal abdomen; the brain is a small part of the field of view.
Cropping to the brain mask (plus a margin) bounds memory and time without changing what the
reconstruction sees (it uses in-mask pixels only). N4 (SimpleITK) removes the smooth receive-coil
bias inside the mask. Standardisation scales each stack so that its in-mask intensity quantile
matches the median over the stacks (the per-slice intensity scales then only absorb what is left).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from gsvr.errors import GsvrError
from gsvr.io.nifti import Stack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing of the stacks: crop to the mask, optional N4 bias correction, intensity standardisation."""

    crop_margin_mm: float = 10.0  #: in-plane margin kept around the mask's bounding box
    n4: bool = False  #: N4 bias-field correction inside the mask
    n4_shrink: int = 2  #: in-plane shrink factor of the N4 fit (the field is smooth)
    n4_iterations: tuple[int, ...] = (50, 50, 30)  #: N4 iterations per fitting level
    standardise: bool = True  #: scale every stack to a common in-mask quantile
    quantile: float = 0.99  #: the quantile standardised
    normalize_quantile: float = 0.99  #: reconstruct: slice intensities divided by this quantile of in-mask voxels
    #: reconstruct: each slice's mask grown in plane by this distance, so registration sees the brain's boundary
    #: against its surroundings (slices at the ends of a stack, with little brain, register far better; 0: as drawn).
    #: Applied when reconstructing, not to the masks ``gsvr preprocess`` writes.
    mask_dilation_mm: float = 4.0

    def __post_init__(self) -> None:
        for name in ("crop_margin_mm", "mask_dilation_mm"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise GsvrError(f"config: preprocess.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("quantile", "normalize_quantile"):
            if not 0 < getattr(self, name) <= 1:
                raise GsvrError(f"config: preprocess.{name} must be in (0, 1], got {getattr(self, name)}")
        if self.n4_shrink < 1 or not self.n4_iterations or any(i < 1 for i in self.n4_iterations):
            raise GsvrError("config: preprocess.n4_shrink and every preprocess.n4_iterations must be >= 1")


def crop_to_mask(stack: Stack, margin_mm: float, *, drop_empty_slices: bool = True) -> Stack:
    """Crop to the mask's bounding box plus ``margin_mm`` in plane; slices without mask are dropped
    at both ends (not inside, to keep the slice spacing) unless ``drop_empty_slices`` is False
    (slice indices then stay those of the input). The affine follows the crop."""
    if not stack.mask.any():
        raise GsvrError(f"{stack.label}: mask is empty")
    idx = np.argwhere(stack.mask)
    lo, hi = idx.min(0), idx.max(0) + 1
    margin = np.ceil(margin_mm / stack.spacing_mm[:2]).astype(int)
    lo[:2] = np.maximum(lo[:2] - margin, 0)
    hi[:2] = np.minimum(hi[:2] + margin, stack.data.shape[:2])
    if not drop_empty_slices:
        lo[2], hi[2] = 0, stack.data.shape[2]
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    affine = stack.affine.copy()
    affine[:3, 3] = stack.affine[:3, :3] @ lo + stack.affine[:3, 3]
    return dataclasses.replace(stack, data=np.ascontiguousarray(stack.data[box]), mask=np.ascontiguousarray(stack.mask[box]),
                               affine=affine)


def n4_bias_correction(stack: Stack, *, shrink: int = 2, iterations: Sequence[int] = (50, 50, 30)) -> Stack:
    """SimpleITK N4 inside the mask, fitted on an in-plane shrunk copy, applied at full resolution."""
    spacing = [float(v) for v in stack.spacing_mm]
    image = sitk.GetImageFromArray(np.transpose(np.maximum(stack.data, 0) + 1e-3, (2, 1, 0)).astype(np.float32))
    image.SetSpacing(spacing)
    mask = sitk.GetImageFromArray(np.transpose(stack.mask, (2, 1, 0)).astype(np.uint8))
    mask.CopyInformation(image)
    factors = [shrink, shrink, 1]
    small, small_mask = sitk.Shrink(image, factors), sitk.Shrink(mask, factors)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
    n4.Execute(small, small_mask)
    log_bias = n4.GetLogBiasFieldAsImage(image)
    bias = np.transpose(np.exp(sitk.GetArrayFromImage(log_bias)), (2, 1, 0))
    corrected = (stack.data / bias).astype(np.float32)
    # Keep the input's intensity level: N4 fixes the bias only up to a global factor.
    inside = stack.mask
    corrected *= np.float32(np.median(stack.data[inside]) / max(float(np.median(corrected[inside])), 1e-12))
    return dataclasses.replace(stack, data=corrected)


def dilate_masks_inplane(stacks: Sequence[Stack], radius_mm: float) -> list[Stack]:
    """Every slice's mask grown in plane by a disc of ``radius_mm`` (slices without mask stay empty)."""
    from scipy import ndimage  # here: the workflow's preprocess environment has no SciPy

    if radius_mm <= 0:
        return list(stacks)
    out = []
    for s in stacks:
        r = np.floor(radius_mm / s.spacing_mm[:2]).astype(int)
        di, dj = np.meshgrid(np.arange(-r[0], r[0] + 1) * s.spacing_mm[0], np.arange(-r[1], r[1] + 1) * s.spacing_mm[1],
                             indexing="ij")
        disc = (di**2 + dj**2 <= radius_mm**2)[:, :, None]
        out.append(dataclasses.replace(s, mask=ndimage.binary_dilation(s.mask, structure=disc)))
    return out


def standardise_intensities(stacks: Sequence[Stack], quantile: float = 0.99) -> list[Stack]:
    """Scale every stack so its in-mask ``quantile`` equals the median of those quantiles."""
    levels = np.array([np.quantile(s.data[s.mask], quantile) for s in stacks])
    if (levels <= 0).any():
        bad = stacks[int(np.argmin(levels))].label
        raise GsvrError(f"{bad}: the in-mask {quantile:.2f} quantile is not positive")
    target = float(np.median(levels))
    return [dataclasses.replace(s, data=(s.data * np.float32(target / lv)).astype(np.float32)) for s, lv in zip(stacks, levels)]


def preprocess_stacks(stacks: Sequence[Stack], config: PreprocessConfig | None = None, *,
                      drop_empty_slices: bool = True) -> list[Stack]:
    """Crop, optionally N4-correct and standardise the stacks (order: crop first, it makes N4 cheap)."""
    cfg = config or PreprocessConfig()
    out = cropped = [crop_to_mask(s, cfg.crop_margin_mm, drop_empty_slices=drop_empty_slices) for s in stacks]
    if cfg.n4:
        out = [n4_bias_correction(s, shrink=cfg.n4_shrink, iterations=cfg.n4_iterations) for s in out]
    if cfg.standardise and len(out) > 1:
        out = standardise_intensities(out, cfg.quantile)
    # Reported once every step has succeeded: a failure is the run's only line.
    for before, after in zip(stacks, cropped):
        log.info("%s: cropped %s -> %s voxels", before.name, before.data.shape, after.data.shape)
    return out


def preprocess_files(stacks: Sequence[str], masks: Sequence[str] | None, output_stacks: Sequence[str],
                     output_masks: Sequence[str], config: PreprocessConfig | None = None) -> list[Stack]:
    """Load, preprocess and write stacks and masks as one set (a failure while writing any of them leaves none
    written; all inputs are checked before anything is written)."""
    from gsvr.io import load_stacks, save_volume
    from gsvr.io.nifti import atomic_outputs, check_writable, overwritten_input, save_mask

    if len(output_stacks) != len(stacks) or len(output_masks) != len(stacks):
        raise GsvrError(f"{len(stacks)} stacks but {len(output_stacks)} output stacks and {len(output_masks)} output masks")
    inputs = [*stacks, *(masks or ())]
    for path in (*output_stacks, *output_masks):
        check_writable(path)
        source = overwritten_input(path, inputs)
        if source is not None:
            raise GsvrError(f"{path}: this output would overwrite the input {source}; write the outputs to another folder")
    out = preprocess_stacks(load_stacks(stacks, masks), config)
    with atomic_outputs([*output_stacks, *output_masks]) as tmp:
        for k, s in enumerate(out):
            save_volume(tmp[k], s.data, s.affine)
            save_mask(tmp[len(out) + k], s.mask, s.affine)
    return out


def folder_stack_paths(folder: str | os.PathLike, n: int | None = None) -> tuple[list[str], list[str]]:
    """Stack and mask paths of a folder of preprocessed stacks (``stack<k>.nii.gz``, ``stack<k>_mask.nii.gz``):
    the ``n`` paths to write, or (``n`` None) those present, in stack order."""
    folder = Path(folder)
    if n is None:
        n = len(list(folder.glob("stack*_mask.nii.gz")))
        if n == 0:
            raise GsvrError(f"{folder}: no preprocessed stacks (stack<k>.nii.gz with stack<k>_mask.nii.gz)")
    return [str(folder / f"stack{k}.nii.gz") for k in range(n)], [str(folder / f"stack{k}_mask.nii.gz") for k in range(n)]
