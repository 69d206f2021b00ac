"""Simulate motion-corrupted thick-slice stacks from a high-resolution volume.

Each pixel is the ground-truth volume (trilinear interpolation of its voxels, not a Gaussian
mixture: no inverse crime) integrated against the slice PSF by quadrature: Gauss-Hermite in
plane (sigma_xy = 1.2 r / 2.3548) and a dense Gaussian-weighted rule through the plane
(sigma_z = t / 2.3548, +-3 sigma). Every slice gets its own rigid motion about the brain
centre, then Rician noise is added. Masks are the ground-truth mask sampled at the moved
pixel centres (as if drawn on the acquired stacks).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation

from gsvr.errors import GsvrError
from gsvr.ops.psf import psf_sigmas_mm

#: The most voxels a simulated stack may have (a clinical stack has about 10^6; 2 GB as float32).
MAX_STACK_VOXELS = 500_000_000


def peak_memory_bytes(n_xy: int, n_z: int, n_stacks: int, n_samples: int) -> int:
    """About the most memory a simulation holds: every stack and mask (float32 + uint8 per voxel), and one slice's
    PSF samples: their float64 positions [P, S, 3] and the float64 and float32 temporaries of their grid
    coordinates (about 97 bytes per sample measured; 112 counted)."""
    return n_stacks * n_xy * n_xy * n_z * 5 + n_xy * n_xy * n_samples * 112


def physical_memory_bytes() -> int | None:
    """This machine's physical memory (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


@dataclass(frozen=True)
class SimulationConfig:
    """Acquisition protocol of a simulation."""

    n_stacks: int = 3  #: stacks; orientations cycle through the three orthogonal ones
    inplane_spacing_mm: float = 0.8
    thickness_mm: float = 3.0
    slice_spacing_mm: float | None = None  #: None = thickness (no gap)
    obliquity_deg: float = 0.0  #: each stack rotated by U(-a, a) per axis from orthogonal
    stack_rotation_deg: float = 0.0  #: head turn between stacks: each stack's anatomy rotated U(-a, a) per axis, not in the header
    motion_rotation_deg: float = 6.0  #: per-slice rotation U(-a, a) per axis
    motion_translation_mm: float = 4.0  #: per-slice translation U(-d, d) per axis
    noise_level: float = 0.02  #: Rician noise sigma as a fraction of the 99th in-mask percentile
    corrupted_fraction: float = 0.0  #: fraction of slices corrupted (signal void or x0.3)
    fov_margin_mm: float = 8.0  #: field of view beyond the brain's bounding sphere
    inplane_fov_mm: float | None = None  #: in-plane field of view (None: the bounding sphere plus margin)
    n_slices: int | None = None  #: slices per stack, centred on the brain (None: cover the bounding sphere plus margin)
    through_plane_samples: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        positive = {"inplane_spacing_mm": self.inplane_spacing_mm, "thickness_mm": self.thickness_mm,
                    "slice_spacing_mm": self.slice_spacing_mm, "inplane_fov_mm": self.inplane_fov_mm}
        at_least_zero = {"obliquity_deg": self.obliquity_deg, "stack_rotation_deg": self.stack_rotation_deg,
                         "motion_rotation_deg": self.motion_rotation_deg, "fov_margin_mm": self.fov_margin_mm,
                         "motion_translation_mm": self.motion_translation_mm, "noise_level": self.noise_level}
        for name, value in positive.items():
            if value is not None and not (math.isfinite(value) and value > 0):
                raise GsvrError(f"simulation: {name} must be a finite number > 0, got {value}")
        for name, value in at_least_zero.items():
            if not (math.isfinite(value) and value >= 0):
                raise GsvrError(f"simulation: {name} must be a finite number >= 0, got {value}")
        if not 0 <= self.corrupted_fraction <= 1:
            raise GsvrError(f"simulation: corrupted_fraction must be in [0, 1], got {self.corrupted_fraction}")
        for name in ("n_stacks", "through_plane_samples"):
            if getattr(self, name) < 1:
                raise GsvrError(f"simulation: {name} must be >= 1, got {getattr(self, name)}")
        if self.n_slices is not None and self.n_slices < 2:
            raise GsvrError(f"simulation: n_slices must be >= 2 or None, got {self.n_slices}")


@dataclass
class SimulatedStack:
    data: np.ndarray  # [X, Y, Z] float32
    mask: np.ndarray  # [X, Y, Z] uint8
    affine: np.ndarray  # [4, 4]
    thickness_mm: float


@dataclass
class Simulation:
    stacks: list[SimulatedStack]
    #: one row per slice: stack_index, slice_index, its true motion as in gsvr's slices.tsv (a pixel at header position x
    #: shows the anatomy at R (x - c) + c + t: rotation vector rx..rz in degrees, centre cx..cz and
    #: translation tx..tz in mm; c is the brain centre), corrupted
    motions: pd.DataFrame
    centre_mm: np.ndarray


def _orientation(k: int) -> np.ndarray:
    """Orthogonal stack k: columns (in-plane x, in-plane y, normal) in world axes."""
    base = [np.eye(3), np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float).T, np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]], float).T]
    return base[k % 3]


def simulate_stacks(volume: np.ndarray, mask: np.ndarray, affine: np.ndarray, cfg: SimulationConfig) -> Simulation:
    """Simulate ``cfg.n_stacks`` stacks.

    Args:
        volume: [X, Y, Z] ground truth.
        mask: [X, Y, Z] brain mask (> 0 inside).
        affine: [4, 4] voxel -> world of both.
    """
    if cfg.n_stacks < 1:
        raise GsvrError("simulate: n_stacks must be >= 1")
    if not (mask > 0).any():
        raise GsvrError("simulate: ground-truth mask is empty")
    rng = np.random.default_rng(cfg.seed)
    spacing_z = cfg.slice_spacing_mm or cfg.thickness_mm
    world_mask = np.argwhere(mask > 0) @ affine[:3, :3].T + affine[:3, 3]
    centre = world_mask.mean(0)
    radius = np.linalg.norm(world_mask - centre, axis=1).max() + cfg.fov_margin_mm
    vol_t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    mask_t = torch.from_numpy(np.ascontiguousarray(mask > 0, dtype=np.float32))[None, None]
    inv_aff = np.linalg.inv(affine)
    noise_sigma = cfg.noise_level * float(np.percentile(volume[mask > 0], 99))
    sig = psf_sigmas_mm((cfg.inplane_spacing_mm, cfg.inplane_spacing_mm), cfg.thickness_mm)
    gh_x, gh_w = np.polynomial.hermite_e.hermegauss(3)  # in-plane, for weight exp(-x^2/2)
    gh_w = gh_w / gh_w.sum()
    z_off = np.linspace(-3.0, 3.0, cfg.through_plane_samples)
    z_w = np.exp(-0.5 * z_off**2)
    z_w /= z_w.sum()
    offsets, weights = [], []
    for a, wa in zip(gh_x, gh_w):
        for b, wb in zip(gh_x, gh_w):
            for c, wc in zip(z_off, z_w):
                offsets.append((a * sig[0], b * sig[1], c * sig[2]))
                weights.append(wa * wb * wc)
    offsets = torch.tensor(offsets, dtype=torch.float64)  # [S, 3] slice frame, mm
    weights = torch.tensor(weights, dtype=torch.float32)  # [S]

    n_xy = int(np.ceil((cfg.inplane_fov_mm or 2 * radius) / cfg.inplane_spacing_mm))
    n_z = cfg.n_slices or int(np.ceil(2 * radius / spacing_z))
    need, have = peak_memory_bytes(n_xy, n_z, cfg.n_stacks, len(weights)), physical_memory_bytes()
    if have is not None and need > 0.8 * have:
        raise GsvrError(f"simulation: {cfg.n_stacks} stacks of {n_xy}x{n_xy}x{n_z} voxels are too large for this machine "
                        f"(about {need / 1e9:.1f} GB of its {have / 1e9:.1f} GB of memory); a larger inplane_spacing_mm, "
                        "slice spacing or fewer through_plane_samples make them smaller")
    if n_xy * n_xy * n_z > MAX_STACK_VOXELS:
        raise GsvrError(f"simulation: stacks of {n_xy}x{n_xy}x{n_z} voxels are too large (more than {MAX_STACK_VOXELS}); "
                        "a larger inplane_spacing_mm or slice spacing makes them smaller")
    stacks, rows = [], []
    for k in range(cfg.n_stacks):
        rot = _orientation(k)
        tilt = Rotation.from_euler("xyz", rng.uniform(-1, 1, 3) * cfg.obliquity_deg, degrees=True).as_matrix()
        # The head turned between stacks: the anatomy of the whole stack is rotated about the brain
        # centre and the header does not know it (unlike the obliquity, which the header records).
        head = Rotation.from_euler("xyz", rng.uniform(-1, 1, 3) * cfg.stack_rotation_deg, degrees=True)
        rot = tilt @ rot
        lin = rot * np.array([cfg.inplane_spacing_mm, cfg.inplane_spacing_mm, spacing_z])
        grid_centre = np.array([(n_xy - 1) / 2, (n_xy - 1) / 2, (n_z - 1) / 2])
        stack_aff = np.eye(4)
        stack_aff[:3, :3] = lin
        stack_aff[:3, 3] = centre - lin @ grid_centre
        data = np.zeros((n_xy, n_xy, n_z), np.float32)
        smask = np.zeros((n_xy, n_xy, n_z), np.uint8)
        ij = np.stack(np.meshgrid(np.arange(n_xy), np.arange(n_xy), indexing="ij"), -1).reshape(-1, 2)
        n_corrupt = int(round(cfg.corrupted_fraction * n_z))
        corrupt = set(rng.choice(n_z, n_corrupt, replace=False).tolist()) if n_corrupt else set()
        for z in range(n_z):
            motion = Rotation.from_euler("xyz", rng.uniform(-1, 1, 3) * cfg.motion_rotation_deg, degrees=True) * head
            shift = rng.uniform(-1, 1, 3) * cfg.motion_translation_mm
            r_m = motion.as_matrix()
            rotvec = np.degrees(motion.as_rotvec())  # the true motion: slice motion after the head turn
            ijk = np.concatenate([ij, np.full((len(ij), 1), z)], 1)
            nominal = ijk @ lin.T + stack_aff[:3, 3]
            moved = (nominal - centre) @ r_m.T + centre + shift  # [P, 3]
            axes = r_m @ rot  # slice axes after motion
            pts = torch.from_numpy(moved)[:, None, :] + (offsets @ torch.from_numpy(axes).T)[None]  # [P, S, 3]
            img = _sample(vol_t, pts, inv_aff) @ weights
            m = _sample(mask_t, torch.from_numpy(moved)[:, None, :], inv_aff)[:, 0] > 0.5
            if noise_sigma > 0:
                img = torch.sqrt((img + torch.from_numpy(rng.normal(0, noise_sigma, len(img))).float()) ** 2
                                 + torch.from_numpy(rng.normal(0, noise_sigma, len(img))).float() ** 2)
            img = img.numpy().reshape(n_xy, n_xy)
            kind = ""
            if z in corrupt:
                kind = ("void", "dark")[int(rng.integers(2))]
                img = _corrupt(img, kind, rng)
            data[:, :, z] = img
            smask[:, :, z] = m.numpy().reshape(n_xy, n_xy)
            rows.append({"stack_index": k, "slice_index": z, "rx_deg": rotvec[0], "ry_deg": rotvec[1], "rz_deg": rotvec[2],
                         "cx_mm": centre[0], "cy_mm": centre[1], "cz_mm": centre[2],
                         "tx_mm": shift[0], "ty_mm": shift[1], "tz_mm": shift[2], "corrupted": kind})
        stacks.append(SimulatedStack(data=data, mask=smask, affine=stack_aff, thickness_mm=cfg.thickness_mm))
    return Simulation(stacks=stacks, motions=pd.DataFrame(rows), centre_mm=centre)


def _sample(vol: torch.Tensor, pts_world: torch.Tensor, inv_aff: np.ndarray, chunk: int = 1 << 20) -> torch.Tensor:
    """Trilinear samples of vol [1, 1, X, Y, Z] at world points [P, S, 3] -> [P, S] (0 outside)."""
    p, s, _ = pts_world.shape
    flat = pts_world.reshape(-1, 3)
    ijk = flat @ torch.from_numpy(inv_aff[:3, :3]).T + torch.from_numpy(inv_aff[:3, 3])
    size = torch.tensor(vol.shape[2:], dtype=torch.float64)
    # grid_sample wants (x, y, z) = (last, middle, first) axis, normalised to [-1, 1].
    norm = (2.0 * ijk / (size - 1) - 1.0).flip(-1).float()
    out = torch.empty(len(norm))
    for start in range(0, len(norm), chunk):
        g = norm[start : start + chunk].reshape(1, 1, 1, -1, 3)
        out[start : start + chunk] = F.grid_sample(vol, g, mode="bilinear", padding_mode="zeros", align_corners=True).reshape(-1)
    return out.reshape(p, s)


def _corrupt(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "dark":
        return img * 0.3
    out = img.copy()  # signal void: a band over a third to a half of the slice
    n = img.shape[0]
    width = int(rng.integers(n // 3, n // 2))
    start = int(rng.integers(0, n - width))
    out[start : start + width] *= 0.05
    return out


def write_simulation(sim: Simulation, out_dir, *, prefix: str = "stack") -> list[str]:
    """Write stacks, masks and motions.tsv into out_dir as one set (a failure while writing any of them leaves
    none written); returns the stack paths."""
    from pathlib import Path

    from gsvr.io.nifti import atomic_outputs, save_mask, save_volume

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise GsvrError(f"{out_dir}: output folder is a file")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{prefix}{k}.nii.gz" for k in range(len(sim.stacks))]
    masks = [out_dir / f"{prefix}{k}_mask.nii.gz" for k in range(len(sim.stacks))]
    # motions.tsv first: the outputs are renamed into place in reverse order, so it appears last (a complete set)
    with atomic_outputs([out_dir / "motions.tsv", *paths, *masks]) as tmp:
        sim.motions.to_csv(tmp[0], sep="\t", index=False)
        for k, st in enumerate(sim.stacks):
            save_volume(tmp[1 + k], st.data, st.affine)
            save_mask(tmp[1 + len(paths) + k], st.mask, st.affine)
    return [str(p) for p in paths]
