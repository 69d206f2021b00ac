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
    iterations: int = 0  #: joint optimisation steps after the initialisation (one step = one pass over the pixels)
    #: joint steps on the slices downsampled 2x in plane before the ``iterations`` full-resolution steps
    #: (GaussianSVR's two-stage multi-resolution; motions carried over)
    multires_steps: int = 0
    batch_fraction: float = 1.0  #: fraction of in-mask pixels used per step (1 = full batch)
    chunk_pixels: int = 8_192  #: pixels per forward/backward chunk (bounds memory)
    knn_every: int = 50  #: steps between neighbour-index rebuilds
    knn_backend: str = "auto"  #: "auto", "kdtree", "faiss" or "torch"
    #: pixels' Gaussians in the joint stage: "topk" (the K nearest) or "block" (M-Gaussian: every Gaussian in
    #: the cubes of side ``block_mm`` within ``block_radius`` cubes of the pixel's; fit and sampling stay top-K)
    neighbour_query: str = "topk"
    block_mm: float = 0.0  #: cube side; 0: the Gaussians' mean spacing (follows a progressive grid)
    block_radius: int = 1
    #: steps between checkpoints of the fit and joint stages when checkpointing (rounded up to a multiple
    #: of knn_every; SVR cycles are checkpointed after each cycle; 0: cycles only)
    checkpoint_every: int = 50
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
    joint_motion: bool = True  #: optimise slice motion in the joint stage too (False: keep the SVR cycles' motion)
    # Motion initialisation before the joint optimisation: classical SVR cycles on a voxel grid.
    init_motion: str = "svr"  #: "svr" (super-resolution + slice-to-volume registration cycles) or "none"
    svr_spacings_mm: tuple = (2.4, 2.4, 1.6, 1.6, 1.6, 1.2)  #: voxel spacing of each cycle, coarse to fine
    svr_translation_only_cycles: int = 2  #: first cycles register translations only
    #: cycles before those, registering each stack as one rigid body to the volume of the other stacks
    svr_stack_spacings_mm: tuple = (3.2, 2.4)
    svr_registration_steps: int = 10  #: Gauss-Newton iterations per registration
    svr_cg_iterations: int = 12  #: conjugate-gradient iterations per super-resolution solve
    svr_tikhonov: float = 0.05  #: gradient penalty of the super-resolution, relative to the data term
    svr_leave_one_out: bool = True  #: register each stack's slices to the volume of the other stacks
    svr_robust: str = "slice"  #: "slice" (GSVR's slice weights below) or "em" (pixel and slice EM, Kuklisova-Murgasova)
    svr_prior: str = "tikhonov"  #: super-resolution prior: "tikhonov" or "edge" (edge-preserving, lagged diffusivity)
    svr_edge_delta: float = 0.1  #: edge scale of the "edge" prior (normalised intensity per mm)
    init_from_svr: bool = True  #: initialise the Gaussians from the SVR volume (else from the slice pixels)
    init_fit_steps: int = 100  #: Adam steps fitting the initial Gaussians to the SVR volume (0 = sampled values only)
    # Losses of the joint optimisation (gsvr.recon.losses).
    loss: str = "l1"  #: pixel term: "l1" (GSVR) or "smooth_l1" (M-Gaussian's Huber loss)
    smooth_l1_beta: float = 0.05  #: transition of smooth_l1 from quadratic to linear (normalised intensity)
    ssim_weight: float = 0.0  #: weight of D-SSIM = 1 - SSIM on whole slices (M-Gaussian, GaussianSVR)
    ssim_window: int = 11  #: Gaussian window (pixels, sigma 1.5) of the SSIM
    tv_weight: float = 0.0  #: weight of the total variation of the predicted slices (GaussianSVR)
    # Neural residual field (gsvr.model.residual, M-Gaussian): a bounded MLP residual on the intensities.
    nrf: bool = False
    nrf_start: int = 0  #: joint steps before the residual field is switched on
    nrf_bound: float = 0.1  #: the residual lies in (-bound, bound) (normalised intensity)
    nrf_bands: int = 6  #: Fourier octaves of the positional encoding
    nrf_hidden: int = 64
    nrf_layers: int = 4
    lr_nrf: float = 1e-4
    # Regularisation.
    scale_reg_weight: float = 2.5e-3  #: lambda_reg of GSVR Eq. 7
    scale_target_mm: float = 1.6  #: s_target of GSVR Eq. 7
    aniso_weight: float = 0.0  #: M-Gaussian's anisotropy penalty: mean of max(s_max / s_min - ratio, 0)
    aniso_max_ratio: float = 3.0  #: largest scale ratio of a Gaussian before the penalty applies
    gauge_weight: float = 1.0  #: keeps the mean slice motion and mean slice scale at zero
    # Initialisation.
    init_adaptive: bool = True  #: content-adaptive (gradient) initialisation; False = uniform
    lambda_init: float = 0.0  #: mixing of uniform sampling into the adaptive one
    #: M-Gaussian's progressive grid: the Gaussians start on a uniform grid of the first spacing (from
    #: the SVR volume) and move to the next at each of ``progressive_milestones`` (joint steps); () keeps
    #: GSVR's content-adaptive sampling of ``n_gaussians``; one spacing: a fixed uniform grid
    progressive_spacings_mm: tuple = ()
    progressive_milestones: tuple = ()
    grid_scale: float = 1.0  #: initial standard deviation of the grid's Gaussians, in grid spacings
    #: 3DGS density control in the joint stage (gsvr.model.densify): every ``densify_every`` steps (0: off)
    #: up to ``densify_until`` (0: all), the top ``densify_fraction`` of Gaussians by mean position
    #: gradient are cloned (largest scale <= ``split_scale_mm``) or split; |value| below
    #: ``prune_fraction`` x the median |value| are pruned; never more than ``max_gaussians``
    densify_every: int = 0
    densify_until: int = 0
    densify_fraction: float = 0.05
    split_scale_mm: float = 1.0
    prune_fraction: float = 0.02
    max_gaussians: int = 200_000
    init_scale_min_mm: float = 0.4
    init_scale_max_mm: float = 3.0
    # Robust slice weights (GSVR public code).
    slice_weights: bool = True
    weight_every: int = 50
    weight_z_scale: float = 4.0
    weight_mad_floor: float = 0.02
    # Data and preprocessing (gsvr.preprocess).
    crop_margin_mm: float = 10.0  #: stacks cropped in plane to their mask's bounding box plus this margin
    standardise_stacks: bool = True  #: scale stacks to a common in-mask 99th percentile
    n4_bias_correction: bool = False  #: N4 bias-field correction inside each mask (SimpleITK)
    registration: str = "stack"  #: "stack": rigid stack-to-stack alignment (multi-start) before SVR; "none" keeps the headers
    registration_max_angle_deg: float = 90.0  #: largest stack-to-stack rotation the multi-start covers
    normalize_quantile: float = 0.99  #: intensities divided by this quantile of in-mask voxels
    output_resolution_mm: float = 0.8
    output_k_neighbors: int = 32  #: Gaussians summed per voxel when sampling the volume
    # Run.
    seed: int = 0
    device: str = "auto"  #: "auto", "cpu" or "cuda"

    def __post_init__(self) -> None:
        choices = {"render_mode": ("exact", "normalized"), "schedule": ("step", "cosine"),
                   "knn_backend": ("auto", "kdtree", "faiss", "torch"), "device": ("auto", "cpu", "cuda"),
                   "init_motion": ("svr", "none"), "registration": ("stack", "none"), "svr_robust": ("slice", "em"),
                   "svr_prior": ("tikhonov", "edge"), "loss": ("l1", "smooth_l1"),
                   "neighbour_query": ("topk", "block")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise GsvrError(f"config: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name, may_be_empty in (("svr_spacings_mm", False), ("svr_stack_spacings_mm", True), ("progressive_spacings_mm", True)):
            spacings = getattr(self, name)
            if (not spacings and not may_be_empty) or any(not isinstance(v, (int, float)) or v <= 0 for v in spacings):
                raise GsvrError(f"config: {name} must be a {'' if may_be_empty else 'non-empty '}list of positive spacings, "
                                f"got {spacings!r}")
        for name in ("iterations", "multires_steps", "init_fit_steps", "svr_translation_only_cycles", "svr_registration_steps",
                     "svr_cg_iterations", "checkpoint_every", "ssim_weight", "tv_weight", "aniso_weight", "nrf_start", "nrf_bands",
                     "block_mm", "block_radius", "densify_every", "densify_until", "prune_fraction"):
            if getattr(self, name) < 0:
                raise GsvrError(f"config: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("smooth_l1_beta", "nrf_bound", "aniso_max_ratio", "grid_scale", "split_scale_mm", "output_resolution_mm"):
            if getattr(self, name) <= 0:
                raise GsvrError(f"config: {name} must be > 0, got {getattr(self, name)}")
        for name in ("n_gaussians", "k_neighbors", "chunk_pixels", "knn_every", "weight_every", "step_size", "nrf_hidden",
                     "nrf_layers", "max_gaussians"):
            if getattr(self, name) < 1:
                raise GsvrError(f"config: {name} must be >= 1, got {getattr(self, name)}")
        if self.aniso_max_ratio < 1:
            raise GsvrError(f"config: aniso_max_ratio must be >= 1, got {self.aniso_max_ratio}")
        if self.ssim_window < 3 or self.ssim_window % 2 == 0:
            raise GsvrError(f"config: ssim_window must be an odd number >= 3, got {self.ssim_window}")
        if not 0 < self.densify_fraction <= 1:
            raise GsvrError(f"config: densify_fraction must be in (0, 1], got {self.densify_fraction}")
        miles = self.progressive_milestones
        if len(miles) != max(len(self.progressive_spacings_mm) - 1, 0) or any(
                not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in miles) or list(miles) != sorted(set(miles)):
            raise GsvrError("config: progressive_milestones must be increasing joint steps >= 1, one per refinement "
                            f"(len(progressive_spacings_mm) - 1), got {miles!r}")
        if self.progressive_spacings_mm and not (self.motion and self.init_motion == "svr" and self.init_from_svr):
            raise GsvrError("config: progressive_spacings_mm starts the grid from the SVR volume: it needs motion, "
                            "init_motion: svr and init_from_svr")
        if self.densify_every and len(self.progressive_spacings_mm) > 1:
            raise GsvrError("config: densify_every and a progressive grid (refinements interpolate on the grid's nodes) "
                            "cannot be combined")
        if not 0 < self.batch_fraction <= 1:
            raise GsvrError(f"config: batch_fraction must be in (0, 1], got {self.batch_fraction}")

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
            if kind is tuple and isinstance(value, list):
                value = tuple(float(v) if name.endswith("_mm") and isinstance(v, int) and not isinstance(v, bool) else v
                              for v in value)
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

    def svr_settings(self) -> "SvrSettings":
        """The settings of the classical SVR cycles (motion initialisation and the svr_classic baseline)."""
        from gsvr.recon.svr import SvrSettings

        return SvrSettings(spacings_mm=tuple(float(v) for v in self.svr_spacings_mm),
                           translation_only_cycles=self.svr_translation_only_cycles,
                           stack_spacings_mm=tuple(float(v) for v in self.svr_stack_spacings_mm),
                           reg_steps=self.svr_registration_steps, cg_iterations=self.svr_cg_iterations,
                           tikhonov=self.svr_tikhonov, leave_one_out=self.svr_leave_one_out, robust=self.svr_robust,
                           prior=self.svr_prior, edge_delta=self.svr_edge_delta)

    def replace(self, **changes: Any) -> "ReconConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
