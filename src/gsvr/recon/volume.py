"""Sampling the reconstructed field on a world grid; saving and loading models."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gsvr.errors import GsvrError
from gsvr.io.nifti import atomic_output
from gsvr.model.field import GaussianField
from gsvr.ops.knn import knn

MODEL_FORMAT = "gsvr-model-1"


@dataclass
class SampledVolume:
    """data: [X, Y, Z] float32 in input intensity units; affine: [4, 4] voxel -> world (RAS+ mm)."""

    data: np.ndarray
    affine: np.ndarray


def output_grid(points_mm: np.ndarray, resolution_mm: float, margin_mm: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """Axis-aligned (RAS) grid covering ``points_mm`` [P, 3] plus a margin."""
    lo = points_mm.min(0) - margin_mm
    hi = points_mm.max(0) + margin_mm
    shape = tuple(int(math.ceil((h - l) / resolution_mm)) + 1 for l, h in zip(lo, hi))
    affine = np.eye(4)
    affine[:3, :3] *= resolution_mm
    affine[:3, 3] = lo
    return shape, affine


@torch.no_grad()
def sample_volume(model: dict, *, resolution_mm: float, device: torch.device | str = "cpu", chunk: int = 65536) -> SampledVolume:
    """Render the field (no PSF) on a grid covering the motion-corrected in-mask pixels.

    Voxels farther than ``support_radius_mm`` from every in-mask pixel are 0.
    """
    if not (math.isfinite(resolution_mm) and resolution_mm > 0):
        raise GsvrError(f"output resolution must be a finite number > 0 mm, got {resolution_mm}")
    field_ = GaussianField.from_state(model["field"], device)
    support = model["support_points"].to(device)
    radius = float(model["support_radius_mm"])
    backend, k, delta = sampling_settings(model["config"])
    shape, affine_local = output_grid(support.cpu().numpy().astype(np.float64), resolution_mm, radius)
    n_vox = int(np.prod(shape))
    if n_vox > 2_000_000_000 // 4:
        raise GsvrError(f"output grid {shape} at {resolution_mm} mm is too large")
    out = np.zeros(n_vox, dtype=np.float32)
    axes = [torch.arange(n, device=device, dtype=torch.float32) * resolution_mm + float(affine_local[i, 3]) for i, n in enumerate(shape)]
    for start in range(0, n_vox, chunk * 4):
        flat = torch.arange(start, min(start + chunk * 4, n_vox), device=device)
        ijk = torch.stack(torch.unravel_index(flat, shape), -1)
        pts = torch.stack([axes[d][ijk[:, d]] for d in range(3)], -1)
        near = knn(support, pts, 1, backend=backend)[:, 0]
        inside = (pts - support[near]).norm(dim=-1) <= radius
        if inside.any():
            vals = field_.sample(pts[inside], k=k, knn_backend=backend, chunk=chunk, delta=delta)
            block = np.zeros(len(flat), dtype=np.float32)
            block[inside.cpu().numpy()] = vals.clamp_min(0).cpu().numpy()
            out[start : start + len(flat)] = block
    affine = affine_local.copy()
    affine[:3, 3] += model["origin_mm"]
    return SampledVolume(data=out.reshape(shape) * np.float32(model["intensity_scale"]), affine=affine)


def sampling_settings(config: dict) -> tuple[str, int, float]:
    """kNN backend, Gaussians per voxel and delta from a model's saved settings (nested, or the flat layout of gsvr 0.1)."""
    if "model" in config:
        return config["model"]["knn_backend"], config["output"]["k_neighbors"], config["model"]["delta"]
    return config["knn_backend"], config["output_k_neighbors"], config["delta"]


def save_model(path: str | Path, model: dict) -> None:
    """Save the Gaussians, motions and everything sample-volume needs (atomic)."""
    with atomic_output(path) as tmp:
        torch.save({"format": MODEL_FORMAT, **model}, tmp)


def load_model(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise GsvrError(f"{path}: model is a folder, not a model file")
    if not path.is_file():
        raise GsvrError(f"{path}: model file does not exist")
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for corrupt files
        raise GsvrError(f"{path}: cannot read gsvr model ({exc.__class__.__name__})") from exc
    if not isinstance(model, dict) or model.get("format") != MODEL_FORMAT:
        raise GsvrError(f"{path}: not a gsvr model file (expected format {MODEL_FORMAT})")
    return model
