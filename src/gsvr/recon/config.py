"""Reconstruction settings: one frozen dataclass per stage, nested in :class:`ReconConfig`.

Defaults live in the dataclasses, once; each check sits in the ``__post_init__`` of the section
that owns the field. An optional component is a section that is ``None`` (``null`` in YAML) when
off. ``from_dict`` refuses unknown keys (naming their full path) and the flat layout of gsvr 0.1
(naming the new key of each old one). ``config/recon_default.yaml`` and ``docs/configuration.md``
are generated from these classes (:mod:`gsvr.recon.config_reference`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional


from gsvr.errors import GsvrError
from gsvr.preprocess.stacks import PreprocessConfig
from gsvr.recon.typed import build, is_integer, is_number, merge, read_yaml


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise GsvrError(f"config: {where} {message}")


def _positive(obj: Any, section: str, *names: str, strict: bool = True) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(value > 0 if strict else value >= 0, f"{section}.{name}", f"must be {'>' if strict else '>='} 0, got {value}")


def _one_of(obj: Any, section: str, name: str, allowed: tuple) -> None:
    _check(getattr(obj, name) in allowed, f"{section}.{name}", f"must be one of {allowed}, got {getattr(obj, name)!r}")


@dataclass(frozen=True)
class SvrSettings:
    """Classical SVR cycles on a voxel grid: super-resolution and slice-to-volume registration, coarse to fine."""

    spacings_mm: tuple[float, ...] = (2.4, 2.4, 1.6, 1.6, 1.6, 1.2)  #: grid spacing of each cycle, coarse to fine
    cg_iterations: int = 12  #: conjugate-gradient iterations of each super-resolution solve
    reg_steps: int = 10  #: Gauss-Newton iterations of each registration
    lm_damping: float = 0.1  #: Levenberg-Marquardt damping (fraction of the normal-matrix diagonal)
    max_step_rad: float = 0.05  #: largest rotation of one Gauss-Newton step
    max_step_mm: float = 2.0  #: largest translation of one Gauss-Newton step
    prior_rotation_rad: float = 0.1  #: std of the zero-mean prior on each slice's rotation (per axis)
    prior_translation_mm: float = 5.0  #: std of the zero-mean prior on each slice's translation (per axis)
    #: gradient penalty relative to the mean data-term diagonal (why 0.02 and not 0.05: docs/results.md section 18)
    tikhonov: float = 0.02
    psf_normal: int = 5  #: Gauss-Hermite nodes through the slice
    psf_inplane: int = 1  #: Gauss-Hermite nodes per in-plane axis
    translation_only_cycles: int = 2  #: first cycles register translation only (rotation needs a sharper volume)
    #: cycles before those of ``spacings_mm`` that register each stack as one rigid body to the volume of the
    #: other stacks (through the PSF, so thick and thin directions are compared like with like); needs 2+ stacks
    stack_spacings_mm: tuple[float, ...] = (3.2, 2.4)
    leave_one_out: bool = True  #: register each stack's slices to the volume of the other stacks
    #: a last cycle registers each stack's slices to the super-resolution of the other stacks on the output grid, its
    #: penalty chosen on held-out pixels as the output solve's (leave-one-out only; docs/results.md section 21)
    output_registration: bool = True
    #: robust statistics: "slice" (slice weights from the mean residual, ``weight_fn``) or "em" (Kuklisova-Murgasova:
    #: EM on a pixel-wise inlier Gaussian / outlier uniform mixture, then a two-class mixture of
    #: the slice potentials; the super-resolution weights each pixel by both posteriors)
    robust: str = "slice"
    em_iterations: int = 10  #: EM iterations of each mixture per cycle
    #: super-resolution prior: "tikhonov" (gradient penalty) or "edge" (the penalty re-weighted by
    #: 1 / sqrt(1 + (|grad v| / delta)^2) from a first Tikhonov solve, then solved again: edges are kept)
    prior: str = "tikhonov"
    edge_delta: float = 0.1  #: edge scale of the "edge" prior (intensities are normalised to ~1)
    scale_bounds: tuple[float, float] = (0.5, 2.0)  #: clamp of the per-slice intensity scale
    #: registration failures: a slice whose fitted intensity scale lies far from the other slices' is down-weighted
    #: by exp(-1/2 (z / scale_outlier_z)^2), z = |log scale - median| / max(1.4826 MAD, 0.05) (a slice turned off its
    #: anatomy needs a scale at the clamp to fit; docs/results.md section 11); null: off
    scale_outlier_z: float | None = 4.0
    #: registration failures seen by their fit: a slice whose NCC after its leave-one-out registration lies below
    #: the other slices' is down-weighted by exp(-1/2 (z / ncc_outlier_z)^2), z = max(median - NCC, 0) /
    #: max(1.4826 MAD, 0.005) (slice cycles only; docs/results.md section 16); null: off
    ncc_outlier_z: float | None = None
    chunk_pixels: int = 65_536
    margin_mm: float = 4.0  #: the voxel grid covers the slices' in-mask pixels plus this margin
    #: factors of the gradient penalty of the super-resolution on the output grid after the cycles (svr_classic's
    #: volume, and the fit's target) tried on 90 % of the pixels; the one with the smallest weighted error on the
    #: other 10 % (a fixed, hashed split) is used (self-supervised; docs/method.md); null: the factor 1
    output_tikhonov_factors: tuple[float, ...] | None = (1.0, 0.5, 0.25)

    def __post_init__(self) -> None:
        if self.robust not in ("slice", "em") or self.prior not in ("tikhonov", "edge"):
            raise GsvrError(f"config: svr.robust must be 'slice' or 'em' and svr.prior 'tikhonov' or 'edge', "
                            f"got {self.robust!r}, {self.prior!r}")
        for name, may_be_empty in (("spacings_mm", False), ("stack_spacings_mm", True)):
            v = getattr(self, name)
            if (not v and not may_be_empty) or any(not isinstance(x, (int, float)) or not x > 0 for x in v):
                raise GsvrError(f"config: svr.{name} must be a {'' if may_be_empty else 'non-empty '}list of positive "
                                f"spacings, got {v!r}")
        for name in ("psf_normal", "psf_inplane", "em_iterations", "chunk_pixels"):
            if getattr(self, name) < 1:
                raise GsvrError(f"config: svr.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("cg_iterations", "reg_steps", "translation_only_cycles", "lm_damping", "tikhonov", "margin_mm"):
            if getattr(self, name) < 0:
                raise GsvrError(f"config: svr.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("scale_outlier_z", "ncc_outlier_z"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise GsvrError(f"config: svr.{name} must be a finite number > 0 or null, got {v}")
        for name in ("max_step_rad", "max_step_mm", "prior_rotation_rad", "prior_translation_mm", "edge_delta"):
            if not getattr(self, name) > 0:
                raise GsvrError(f"config: svr.{name} must be > 0, got {getattr(self, name)}")
        if len(self.scale_bounds) != 2 or not 0 < self.scale_bounds[0] <= 1 <= self.scale_bounds[1]:
            raise GsvrError(f"config: svr.scale_bounds must be [low <= 1, high >= 1], got {self.scale_bounds!r}")
        factors = self.output_tikhonov_factors
        if factors is not None and (not factors or any(not is_number(x) or not (math.isfinite(x) and x > 0) for x in factors)):
            raise GsvrError(f"config: svr.output_tikhonov_factors must be a non-empty list of finite factors > 0 or null, "
                            f"got {factors!r}")

    def n_cycles(self, n_stacks: int) -> int:
        """Cycles :func:`svr_cycles` runs on ``n_stacks`` stacks (whole-stack cycles need leave-one-out)."""
        loo = self.leave_one_out and n_stacks > 1
        return len(self.spacings_mm) + (len(self.stack_spacings_mm) + self.output_registration if loo else 0)


@dataclass(frozen=True)
class ModelConfig:
    """The Gaussian forward model, shared by every stage that renders the field."""

    k_neighbors: int = 32  #: Gaussians summed per pixel (top-K by distance to the mean)
    render_mode: str = "normalized"  #: "normalized" (GSVR Eq. 5: a value K barely changes) or "exact" (the plain sum: its value depends on K; docs/results.md section 16)
    psf: bool = True  #: model the slice PSF (false: point sampling, the "no PSF" ablation)
    delta: float = 1e-4  #: stabiliser of the normalized mode's denominator
    #: the Gaussians' intensities: "linear" (the parameter itself) or "softplus" (softplus of the parameter, never
    #: negative: GSVR's public code)
    intensity: str = "linear"
    knn_every: int = 50  #: steps between neighbour-index rebuilds (fit and joint stages)
    knn_backend: str = "auto"  #: "auto", "kdtree", "faiss" or "torch"
    #: pixels (or voxels) per forward/backward chunk: bounds memory, and keeps a chunk's neighbour rows in the CPU's
    #: cache (bench/render_kernel.py)
    chunk_pixels: int = 8_192

    def __post_init__(self) -> None:
        _one_of(self, "model", "render_mode", ("exact", "normalized"))
        _one_of(self, "model", "knn_backend", ("auto", "kdtree", "faiss", "torch"))
        _one_of(self, "model", "intensity", ("linear", "softplus"))
        _positive(self, "model", "k_neighbors", "knn_every", "chunk_pixels")
        _positive(self, "model", "delta", strict=False)


@dataclass(frozen=True)
class AlignConfig:
    """Rigid stack-to-stack alignment (multi-start over rotations) before the SVR cycles."""

    max_angle_deg: float = 90.0  #: largest stack-to-stack rotation the multi-start covers

    def __post_init__(self) -> None:
        _check(0 <= self.max_angle_deg <= 180, "align.max_angle_deg", f"must be in [0, 180], got {self.max_angle_deg}")


@dataclass(frozen=True)
class InitConfig:
    """Initial Gaussians: sampled from the SVR volume (or from the slice pixels), content-adaptive."""

    n_gaussians: int = 50_000  #: number of Gaussian primitives
    from_svr: bool = True  #: initialise from the SVR volume (false: from the slice pixels)
    adaptive: bool = True  #: content-adaptive (gradient) sampling; false: uniform
    lambda_init: float = 0.0  #: mixing of uniform sampling into the adaptive one
    scale_min_mm: float = 0.4  #: smallest initial standard deviation
    scale_max_mm: float = 3.0  #: largest initial standard deviation

    def __post_init__(self) -> None:
        _positive(self, "init", "n_gaussians", "scale_min_mm")
        _check(0 <= self.lambda_init <= 1, "init.lambda_init", f"must be in [0, 1], got {self.lambda_init}")
        _check(self.scale_max_mm >= self.scale_min_mm, "init.scale_max_mm", "must be >= init.scale_min_mm")


@dataclass(frozen=True)
class FieldRates:
    """Learning rates of the Gaussians' parameters (Adam in the fit and refine stages, AdamW in the joint stage)."""

    means: float = 2.5e-2
    scales: float = 2.5e-2  #: of the log standard deviations
    quats: float = 1e-2
    values: float = 1e-2

    def check(self, section: str) -> None:
        _positive(self, f"{section}.lr", "means", "scales", "quats", "values", strict=False)


@dataclass(frozen=True)
class FitConfig:
    """Fit of all Gaussian parameters to the SVR volume (L1, Adam, all covered voxels or a fresh sample of them each step)."""

    #: Adam steps (the sampled initialisation alone reproduces the volume only roughly; the refinement on the slices
    #: that follows does better from fewer: from 50 than from 100 at the PSF nodes, docs/results.md section 20; from 25
    #: than from 50 through the output grid, section 23)
    steps: int = 25
    lr: FieldRates = field(default_factory=FieldRates)
    #: the volume fitted: "output" (the super-resolution on the output grid after the SVR cycles, its regularisation
    #: chosen on held-out pixels: svr_classic's volume) or "svr" (the last cycle's volume at its spacing, 1.2 mm:
    #: worse by 0.3-0.9 dB on the severe protocol; docs/results.md section 16)
    target: str = "output"
    #: fraction of the covered voxels each step fits, drawn afresh every step (1: all of them). At 0.3 the fit to the
    #: 0.8 mm volume reaches the full fit's quality in about half its time (section 16)
    voxel_fraction: float = 0.3

    def __post_init__(self) -> None:
        _positive(self, "fit", "steps")
        _check(0 < self.voxel_fraction <= 1, "fit.voxel_fraction", f"must be in (0, 1], got {self.voxel_fraction}")
        self.lr.check("fit")
        _check(self.target in ("output", "svr"), "fit.target", f"must be 'output' or 'svr', got {self.target!r}")


@dataclass(frozen=True)
class RefineConfig:
    """Refinement of the fitted Gaussians on the slices, through the voxel operator's PSF quadrature of the field
    (sampled on the output grid, or at each pixel's PSF nodes: ``sampling``; slice motion, weights and scales frozen;
    weighted squared error; Adam). Its length is chosen on held-out slices:
    a second field, fitted to the output-grid super-resolution of the other slices, is refined on them until its
    error on the held-out slices stops falling; the field of all slices is then refined for the step count at that
    split's smallest held-out error (0: not refined), and the slices registered again to the refined field
    (``register_rounds``). See :mod:`gsvr.recon.refine`."""

    max_steps: int = 24  #: most steps the split refines, and so the field of all slices (bounds the stage's time)
    every: int = 2  #: steps between two held-out evaluations of the split
    patience: int = 2  #: evaluations without a new held-out minimum before the split stops
    holdout_fraction: float = 0.1  #: fraction of the slices held out (at least one), chosen by a hash of their index
    #: fraction of the pixels each step fits, drawn afresh every step (1: all; through the grid all cost no more than
    #: a half, and the steps are less noisy: docs/results.md section 23)
    pixel_fraction: float = 1.0
    #: where the field meets the slices: "grid" (sampled on the output grid, then the voxel operator's sparse matrix:
    #: one evaluation per voxel) or "nodes" (sampled at every pixel's PSF nodes); see :mod:`gsvr.recon.refine`
    sampling: str = "grid"
    #: rounds after the refinement of all slices, each registering every slice to the refined field (sampled on the
    #: output grid), refitting the slices' intensity scales and refining ``register_steps`` more steps (at most the
    #: split's step count; none when it was 0): the field predicts the slices better than the voxel volume the SVR
    #: cycles registered them to (docs/results.md section 25); 0: off
    register_rounds: int = 3
    register_steps: int = 6  #: refinement steps after each registration round
    lr: FieldRates = field(default_factory=FieldRates)

    def __post_init__(self) -> None:
        _positive(self, "refine", "max_steps", "every", "patience")
        _positive(self, "refine", "register_rounds", "register_steps", strict=False)
        _check(0 < self.holdout_fraction < 1, "refine.holdout_fraction", f"must be in (0, 1), got {self.holdout_fraction}")
        _check(0 < self.pixel_fraction <= 1, "refine.pixel_fraction", f"must be in (0, 1], got {self.pixel_fraction}")
        _check(self.sampling in ("grid", "nodes"), "refine.sampling", f"must be 'grid' or 'nodes', got {self.sampling!r}")
        self.lr.check("refine")

    def round_steps(self, steps: int) -> int:
        """Refinement steps of all registration rounds after a refinement of ``steps`` (at most ``steps`` a round: what
        the held-out split allowed; none after none)."""
        return self.register_rounds * min(self.register_steps, steps)

    def most_steps(self) -> int:
        """The most refinement steps the stage runs (the split's, those of the field of all slices, the rounds'), its
        split's fit aside: what the progress bar counts for it."""
        return 2 * self.max_steps + self.round_steps(self.max_steps)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW on the field, slice motions and slice scales, with a learning-rate schedule."""

    lr: FieldRates = field(default_factory=FieldRates)
    rotation: float = 2.5e-3  #: learning rate of slice rotations (radians per step scale)
    translation: float = 1e-1  #: learning rate of slice translations (mm per step scale)
    slice_scale: float = 1e-2  #: learning rate of the per-slice log intensity scale
    weight_decay: float = 0.0
    schedule: str = "step"  #: "step" (x step_gamma every step_size steps) or "cosine" (to cosine_final)
    step_size: int = 200
    step_gamma: float = 0.5
    cosine_final: float = 0.1

    def __post_init__(self) -> None:
        _one_of(self, "joint.optim", "schedule", ("step", "cosine"))
        self.lr.check("joint.optim")
        _positive(self, "joint.optim", "rotation", "translation", "slice_scale", "weight_decay", "step_gamma",
                  "cosine_final", strict=False)
        _positive(self, "joint.optim", "step_size")


@dataclass(frozen=True)
class AnisotropyConfig:
    """M-Gaussian's anisotropy penalty: weight x mean over Gaussians of max(s_max / s_min - max_ratio, 0)."""

    weight: float = 0.01
    max_ratio: float = 3.0  #: largest scale ratio of a Gaussian before the penalty applies

    def __post_init__(self) -> None:
        _positive(self, "joint.loss.anisotropy", "weight", strict=False)
        _check(self.max_ratio >= 1, "joint.loss.anisotropy.max_ratio", f"must be >= 1, got {self.max_ratio}")


@dataclass(frozen=True)
class LossConfig:
    """The joint stage's loss: a pixel term, whole-slice terms and regularisers."""

    pixel: str = "l1"  #: "l1" (GSVR) or "smooth_l1" (M-Gaussian's Huber loss)
    smooth_l1_beta: float = 0.05  #: transition of smooth_l1 from quadratic to linear (normalised intensity)
    ssim_weight: float = 0.0  #: weight of D-SSIM = 1 - SSIM on whole slices (M-Gaussian, GaussianSVR)
    ssim_window: int = 11  #: Gaussian window (pixels, sigma 1.5) of the SSIM
    tv_weight: float = 0.0  #: weight of the total variation of the predicted slices (GaussianSVR)
    scale_reg_weight: float = 2.5e-3  #: lambda_reg of GSVR Eq. 7
    scale_target_mm: float = 1.6  #: s_target of GSVR Eq. 7
    #: "two_sided": the mean over Gaussians of sum_axes (s - s_target)^2 (GSVR Eq. 7); "lower": the mean over
    #: Gaussians and axes of max(log s_target - log s, 0)^2, only Gaussians smaller than the target pay (GSVR's public code)
    scale_reg: str = "two_sided"
    #: weight of the mean over slices and axes of q_xyz^2, q the unit quaternion of the slice rotation (GSVR's public code: 0.01)
    motion_rotation_weight: float = 0.0
    #: weight of the mean over slices and axes of t^2, t the slice translation in mm (GSVR's public code: 2e-4)
    motion_translation_weight: float = 0.0
    gauge_weight: float = 1.0  #: keeps the mean slice motion and mean slice scale at zero
    anisotropy: Optional[AnisotropyConfig] = None  #: M-Gaussian's anisotropy penalty (null: off)

    def __post_init__(self) -> None:
        _one_of(self, "joint.loss", "pixel", ("l1", "smooth_l1"))
        _one_of(self, "joint.loss", "scale_reg", ("two_sided", "lower"))
        _positive(self, "joint.loss", "smooth_l1_beta", "scale_target_mm")
        _positive(self, "joint.loss", "ssim_weight", "tv_weight", "scale_reg_weight", "gauge_weight",
                  "motion_rotation_weight", "motion_translation_weight", strict=False)
        _check(self.ssim_window >= 3 and self.ssim_window % 2 == 1, "joint.loss.ssim_window",
               f"must be an odd number >= 3, got {self.ssim_window}")


@dataclass(frozen=True)
class ResidualFieldConfig:
    """M-Gaussian's neural residual field: a bounded MLP residual on the Gaussians' intensities."""

    start: int = 0  #: joint steps before the residual field is switched on
    bound: float = 0.1  #: the residual lies in (-bound, bound) (normalised intensity)
    bands: int = 6  #: Fourier octaves of the positional encoding
    hidden: int = 64
    layers: int = 4
    lr: float = 1e-4

    def __post_init__(self) -> None:
        _positive(self, "joint.residual_field", "start", "bands", "lr", strict=False)
        _positive(self, "joint.residual_field", "bound", "hidden", "layers")


@dataclass(frozen=True)
class DensifyConfig:
    """3DGS density control (gsvr.model.densify): clone, split and prune every ``every`` steps."""

    every: int = 100  #: steps between density controls
    until: Optional[int] = None  #: last step with density control (null: all)
    fraction: float = 0.05  #: top fraction of Gaussians by mean position gradient cloned or split
    split_scale_mm: float = 1.0  #: Gaussians whose largest scale is above this are split, the others cloned
    prune_fraction: float = 0.02  #: |value| below this x the median |value| are pruned
    max_gaussians: int = 200_000

    def __post_init__(self) -> None:
        _positive(self, "joint.densify", "every", "split_scale_mm", "max_gaussians")
        _positive(self, "joint.densify", "prune_fraction", strict=False)
        _check(self.until is None or self.until >= 1, "joint.densify.until", f"must be >= 1 or null, got {self.until}")
        _check(0 < self.fraction <= 1, "joint.densify.fraction", f"must be in (0, 1], got {self.fraction}")


@dataclass(frozen=True)
class ProgressiveConfig:
    """M-Gaussian's progressive grid: Gaussians on a uniform grid of the first spacing (from the SVR
    volume), moved to the next spacing at each milestone (joint steps); one spacing: a fixed grid."""

    spacings_mm: tuple[float, ...] = (3.2, 2.4, 1.6, 1.2)
    milestones: tuple[int, ...] = (50, 100, 150)  #: one per refinement (len(spacings_mm) - 1), increasing
    grid_scale: float = 1.0  #: initial standard deviation of the grid's Gaussians, in grid spacings

    def __post_init__(self) -> None:
        _check(bool(self.spacings_mm) and all(is_number(v) and v > 0 for v in self.spacings_mm),
               "joint.progressive.spacings_mm", f"must be a non-empty list of positive spacings, got {self.spacings_mm!r}")
        miles = self.milestones
        _check(len(miles) == len(self.spacings_mm) - 1 and all(is_integer(m) and m >= 1 for m in miles)
               and list(miles) == sorted(set(miles)), "joint.progressive.milestones",
               f"must be increasing joint steps >= 1, one per refinement (len(spacings_mm) - 1), got {miles!r}")
        _positive(self, "joint.progressive", "grid_scale")


@dataclass(frozen=True)
class MultiresConfig:
    """GaussianSVR's two-level multi-resolution: joint steps on slices downsampled 2x in plane first."""

    steps: int = 150  #: coarse-level steps before the full-resolution ones (motions carried over)

    def __post_init__(self) -> None:
        _positive(self, "joint.multires", "steps")


@dataclass(frozen=True)
class BlockQueryConfig:
    """M-Gaussian's block query: each pixel sums every Gaussian in the cubes within ``radius`` cubes of its own."""

    size_mm: Optional[float] = None  #: cube side (null: the Gaussians' mean spacing, follows a progressive grid)
    radius: int = 1  #: cubes around the pixel's, per axis

    def __post_init__(self) -> None:
        _check(self.size_mm is None or self.size_mm > 0, "joint.block_query.size_mm", f"must be > 0 or null, got {self.size_mm}")
        _positive(self, "joint.block_query", "radius", strict=False)


@dataclass(frozen=True)
class JointConfig:
    """Joint optimisation of the field, slice motions, scales and weights on the slices."""

    steps: int = 0  #: full-resolution steps (one pass over the pixels each); 0: the fitted (and refined) field is the result
    motion: bool = True  #: optimise slice motion here too (false: keep the motion the SVR cycles and the refine stage left)
    motion_warmup: int = 0  #: steps before slice motion is released
    batch_fraction: float = 1.0  #: fraction of in-mask pixels used per step (1 = full batch)
    block_query: Optional[BlockQueryConfig] = None  #: null: each pixel sums its top-K Gaussians (model.k_neighbors)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    residual_field: Optional[ResidualFieldConfig] = None  #: M-Gaussian's neural residual field (null: off)
    densify: Optional[DensifyConfig] = None  #: 3DGS density control (null: off)
    progressive: Optional[ProgressiveConfig] = None  #: M-Gaussian's progressive grid (null: content-adaptive Gaussians)
    multires: Optional[MultiresConfig] = None  #: GaussianSVR's coarse level first (null: full resolution only)

    def __post_init__(self) -> None:
        _positive(self, "joint", "steps", "motion_warmup", strict=False)
        _check(0 < self.batch_fraction <= 1, "joint.batch_fraction", f"must be in (0, 1], got {self.batch_fraction}")
        _check(not (self.densify and self.progressive and len(self.progressive.spacings_mm) > 1), "joint.densify",
               "and a progressive grid with refinements (they interpolate on the grid's nodes) cannot be combined")


@dataclass(frozen=True)
class SliceWeightsConfig:
    """Robust slice weights (GSVR public code): z = (r - median) / max(1.4826 MAD, mad_floor) of the slices'
    mean absolute residual r; w = exp(-1/2 (max(z, 0) / z_scale)^2). Used by the SVR cycles and the joint stage."""

    every: int = 50  #: joint steps between weight updates
    z_scale: float = 4.0
    mad_floor: float = 0.02

    def __post_init__(self) -> None:
        _positive(self, "slice_weights", "every", "z_scale", "mad_floor")


@dataclass(frozen=True)
class OutputConfig:
    """The output volume."""

    resolution_mm: float = 0.8  #: isotropic voxel size
    k_neighbors: int = 32  #: Gaussians summed per voxel when sampling the volume

    def __post_init__(self) -> None:
        _positive(self, "output", "resolution_mm", "k_neighbors")


@dataclass(frozen=True)
class RunConfig:
    """How the run is executed (results do not depend on checkpoint_every, nor on device up to rounding)."""

    seed: int = 0
    device: str = "auto"  #: "auto", "cpu" or "cuda"
    #: steps between checkpoints of the fit and joint stages when checkpointing (rounded up to a multiple of
    #: model.knn_every); SVR cycles are checkpointed after each cycle; null: cycles only
    checkpoint_every: Optional[int] = 50

    def __post_init__(self) -> None:
        _one_of(self, "run", "device", ("auto", "cpu", "cuda"))
        _check(self.checkpoint_every is None or self.checkpoint_every >= 1, "run.checkpoint_every",
               f"must be >= 1 or null, got {self.checkpoint_every}")


@dataclass(frozen=True)
class ReconConfig:
    """All settings of ``gsvr reconstruct``, one section per stage (prepare, align, svr, init, fit, refine, joint, output)."""

    motion: bool = True  #: estimate slice motion (false: header geometry everywhere, the no-motion baseline)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    align: Optional[AlignConfig] = field(default_factory=AlignConfig)  #: null: keep the headers' stack geometry
    svr: Optional[SvrSettings] = field(default_factory=SvrSettings)  #: null: the joint stage starts from the headers
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    fit: Optional[FitConfig] = field(default_factory=FitConfig)  #: null: the sampled initialisation only
    #: refinement on the slices through the PSF quadrature, its length chosen on held-out slices (null: off)
    refine: Optional[RefineConfig] = field(default_factory=RefineConfig)
    joint: JointConfig = field(default_factory=JointConfig)
    slice_weights: Optional[SliceWeightsConfig] = field(default_factory=SliceWeightsConfig)  #: null: all weights 1
    output: OutputConfig = field(default_factory=OutputConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        _check(not (self.joint.progressive and not (self.motion and self.svr and self.init.from_svr)), "joint.progressive",
               "starts the grid from the SVR volume: it needs motion: true, an svr section and init.from_svr: true")
        _check(not (self.joint.residual_field and self.model.intensity == "softplus"), "joint.residual_field",
               "adds to linear intensities: it needs model.intensity: linear")

    @property
    def svr_cycles_run(self) -> bool:
        """True when the SVR cycles estimate motion before the Gaussian stages."""
        return self.motion and self.svr is not None

    @property
    def refines(self) -> bool:
        """True when the refine stage runs: it refines a content-adaptive field fitted to the output-grid
        super-resolution after the SVR cycles (elsewhere, e.g. on M-Gaussian's progressive grid, a ``refine`` section
        is left unused)."""
        return (self.refine is not None and self.svr_cycles_run and self.fits_output_volume
                and self.joint.progressive is None)

    @property
    def fits_output_volume(self) -> bool:
        """True when the Gaussians are fitted to the output-grid super-resolution that follows the SVR cycles."""
        return self.fit is not None and self.fit.target == "output" and self.init.from_svr

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None, *, source: str = "config") -> "ReconConfig":
        """Typed construction from nested plain values (YAML); unknown keys and wrong types are errors."""
        values = dict(values or {})
        from gsvr.recon.config_reference import FLAT_KEYS

        names = {f.name for f in dataclasses.fields(cls)}  # a true/false section (slice_weights) is also an old key
        old = sorted(k for k in values if k in FLAT_KEYS and (k not in names or (k != "motion" and isinstance(values[k], bool))))
        if old:
            moves = "; ".join(f"{k} -> {FLAT_KEYS[k]}" for k in old)
            raise GsvrError(f"{source}: the flat settings of gsvr 0.1 are no longer read; write them in sections "
                            f"(gsvr config --migrate FILE rewrites a file): {moves}")
        return build(cls, values, source, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ReconConfig":
        return cls.from_dict(read_yaml(path), source=str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def updated(self, changes: Mapping[str, Any], *, source: str = "config") -> "ReconConfig":
        """A copy with ``changes`` merged in: nested values, or dotted keys (``{"output.resolution_mm": 0.5}``)."""
        return ReconConfig.from_dict(merge(self.to_dict(), changes), source=source)
