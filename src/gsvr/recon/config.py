"""Reconstruction settings: one frozen dataclass; defaults live here, unknown keys are errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from gsvr.errors import GsvrError


@dataclass(frozen=True)
class ReconConfig:
    """All knobs of ``gsvr reconstruct``. Units in the names; lr_* are AdamW learning rates."""

    # Representation and forward model.
    n_gaussians: int = 50_000  #: number of Gaussian primitives
    k_neighbors: int = 32  #: Gaussians summed per pixel (top-K by distance to the mean)
    render_mode: str = "exact"  #: "exact" (true PSF convolution) or "normalized" (GSVR Eq. 5)
    psf: bool = True  #: model the slice PSF (False: point sampling, the "no PSF" ablation)
    delta: float = 1e-4  #: stabiliser of the normalized mode's denominator
    # Optimisation.
    iterations: int = 500  #: optimiser steps (one step = one pass over the pixel batch)
    batch_fraction: float = 1.0  #: fraction of in-mask pixels used per step (1 = full batch)
    chunk_pixels: int = 8_192  #: pixels per forward/backward chunk (bounds memory)
    knn_every: int = 50  #: steps between neighbour-index rebuilds
    knn_backend: str = "auto"  #: "auto", "kdtree", "faiss" or "torch"
    lr_means: float = 2.5e-2
    lr_scales: float = 2.5e-2
    lr_quats: float = 1e-2
    lr_values: float = 1e-2
    lr_rotation: float = 2.5e-3  #: slice rotation (radians per step scale)
    lr_translation: float = 1e-1  #: slice translation (mm per step scale)
    lr_slice_scale: float = 1e-2  #: per-slice log intensity scale
    weight_decay: float = 0.0
    schedule: str = "step"  #: "step" (x step_gamma every step_size steps) or "cosine" (to cosine_final)
    step_size: int = 200
    step_gamma: float = 0.5
    cosine_final: float = 0.1
    motion: bool = True  #: optimise slice motion (False: header geometry, the no-motion baseline)
    motion_warmup: int = 0  #: steps before slice motion is released
    # Registration cycles before the joint optimisation (coarse field, alternating blocks).
    register_cycles: int = 0  #: cycles of (fit coarse field, motion frozen) then (fit motion, field frozen); 0 = off
    cycle_steps: int = 40  #: steps of each block of a cycle
    cycle_batch_fraction: float = 0.25  #: pixel fraction per step in the cycles
    coarse_gaussians: int = 4_000  #: Gaussians of the coarse field
    coarse_scale_mm: float = 2.5  #: initial and target scale of the coarse field
    # Regularisation.
    scale_reg_weight: float = 2.5e-3  #: lambda_reg of GSVR Eq. 7
    scale_target_mm: float = 1.6  #: s_target of GSVR Eq. 7
    gauge_weight: float = 1.0  #: keeps the mean slice motion and mean slice scale at zero
    # Initialisation.
    init_adaptive: bool = True  #: content-adaptive (gradient) initialisation; False = uniform
    lambda_init: float = 0.0  #: mixing of uniform sampling into the adaptive one
    init_scale_min_mm: float = 0.4
    init_scale_max_mm: float = 3.0
    # Robust slice weights (GSVR public code).
    slice_weights: bool = True
    weight_every: int = 50
    weight_z_scale: float = 4.0
    weight_mad_floor: float = 0.02
    # Data.
    normalize_quantile: float = 0.99  #: intensities divided by this quantile of in-mask voxels
    output_resolution_mm: float = 0.8
    output_k_neighbors: int = 32  #: Gaussians summed per voxel when sampling the volume
    # Run.
    seed: int = 0
    device: str = "auto"  #: "auto", "cpu" or "cuda"

    def __post_init__(self) -> None:
        choices = {"render_mode": ("exact", "normalized"), "schedule": ("step", "cosine"),
                   "knn_backend": ("auto", "kdtree", "faiss", "torch"), "device": ("auto", "cpu", "cuda")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise GsvrError(f"config: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.register_cycles < 0:
            raise GsvrError(f"config: register_cycles must be >= 0, got {self.register_cycles}")
        for name in ("n_gaussians", "coarse_gaussians", "cycle_steps", "k_neighbors", "iterations", "chunk_pixels", "knn_every", "weight_every", "step_size"):
            if getattr(self, name) < 1:
                raise GsvrError(f"config: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.batch_fraction <= 1:
            raise GsvrError(f"config: batch_fraction must be in (0, 1], got {self.batch_fraction}")
        if self.output_resolution_mm <= 0:
            raise GsvrError(f"config: output_resolution_mm must be > 0, got {self.output_resolution_mm}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None, *, source: str = "config") -> "ReconConfig":
        values = dict(values or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise GsvrError(f"{source}: unknown reconstruction setting(s) {unknown}; known: {sorted(known)}")
        typed = {}
        for name, value in values.items():
            kind = type(known[name].default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise GsvrError(f"{source}: {name} must be {kind.__name__}, got {value!r}")
            typed[name] = value
        return cls(**typed)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ReconConfig":
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise GsvrError(f"{path}: cannot read reconstruction config ({exc})") from exc
        if not isinstance(values, dict):
            raise GsvrError(f"{path}: reconstruction config must be a mapping of setting: value")
        return cls.from_dict(values, source=str(path))

    def replace(self, **changes: Any) -> "ReconConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
