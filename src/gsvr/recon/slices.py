"""Stacks -> the in-mask pixels of every slice, in world space, with per-slice geometry."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation
from torch import Tensor, nn

from gsvr.errors import GsvrError
from gsvr.geometry import axis_angle_to_matrix, matrix_to_axis_angle
from gsvr.io.nifti import Stack
from gsvr.ops.psf import psf_covariance_world, psf_sigmas_mm


@dataclass
class SliceData:
    """All in-mask pixels of all slices. Positions are mm relative to ``origin_mm`` (float32-safe).

    Attributes:
        x0: [P, 3] header (uncorrected) world positions of pixels.
        y: [P] normalised intensities.
        slice_idx: [P] global slice index of each pixel.
        grad_mag: [P] in-plane gradient magnitude (for content-adaptive initialisation).
        jitter_mm: [P, 3] half footprint of each pixel along world axes (initialisation).
        centre: [M, 3] slice centres (mean in-mask pixel position), rotation centre of the motion.
        axes: [M, 3, 3] slice axes (columns: in-plane x, in-plane y, unit normal).
        psf_sigma: [M, 3] PSF standard deviations along those axes (mm).
        stack_of_slice: [M] stack index; slice_in_stack: [M] index along the stack's third axis.
        pixel_ij: [P, 2] in-plane index of each pixel within its slice's mask bounding box (whole-slice
            losses lay the pixels out as images, see :class:`gsvr.recon.losses.SliceImages`).
        origin_mm: [3] float64 world offset added back on output.
        intensity_scale: the normalising quantile (input units per normalised unit).
    """

    x0: Tensor
    y: Tensor
    slice_idx: Tensor
    grad_mag: Tensor
    jitter_mm: Tensor
    centre: Tensor
    axes: Tensor
    psf_sigma: Tensor
    stack_of_slice: np.ndarray
    slice_in_stack: np.ndarray
    origin_mm: np.ndarray
    intensity_scale: float
    stack_names: list[str]
    pixel_ij: Tensor

    @property
    def n_slices(self) -> int:
        return int(self.centre.shape[0])

    @property
    def n_pixels(self) -> int:
        return int(self.x0.shape[0])


def build_slice_data(stacks: Sequence[Stack], *, quantile: float, device: torch.device,
                     like: SliceData | None = None) -> SliceData:
    """Gather the in-mask pixels of every slice of every stack.

    Intensities are divided by the ``quantile`` of all in-mask voxels (robust to outliers).
    Slices whose mask is empty are dropped. ``like``: take the origin and intensity scale of that
    slice data instead (the same stacks at another resolution share the field's frame and units).
    """
    if like is not None:
        scale, origin = like.intensity_scale, like.origin_mm
    else:
        masked = np.concatenate([s.data[s.mask] for s in stacks])
        scale = float(np.quantile(masked, quantile))
        if not np.isfinite(scale) or scale <= 0:
            names = ", ".join(s.label for s in stacks)
            raise GsvrError(f"{names}: the {quantile} quantile of in-mask intensities is {scale}; the stacks are empty or non-positive inside their masks")
        origin = np.concatenate([_world(s.affine, np.argwhere(s.mask)) for s in stacks]).mean(0)

    x0, y, sid, grad, jit, pix = [], [], [], [], [], []
    centre, axes, sigma, stack_of, slice_in = [], [], [], [], []
    for si, s in enumerate(stacks):
        ax = slice_axes(s.affine)
        sp = s.spacing_mm
        sig = psf_sigmas_mm((sp[0], sp[1]), s.thickness_mm)
        # Half footprint of a pixel: half spacing in-plane, half slice spacing through-plane.
        half = np.abs(ax * (0.5 * np.array([sp[0], sp[1], max(sp[2], s.thickness_mm)]))).sum(1)
        norm_data = s.data / scale
        gx = ndimage.sobel(norm_data, axis=0) / (8.0 * sp[0])
        gy = ndimage.sobel(norm_data, axis=1) / (8.0 * sp[1])
        gmag = np.sqrt(gx * gx + gy * gy)
        for z in range(s.n_slices):
            m = s.mask[:, :, z]
            if not m.any():
                continue
            ij = np.argwhere(m)
            pix.append(ij - ij.min(0))
            ijk = np.concatenate([ij, np.full((len(ij), 1), z)], 1)
            w = _world(s.affine, ijk) - origin
            gi = len(centre)
            x0.append(w)
            y.append(norm_data[ij[:, 0], ij[:, 1], z])
            grad.append(gmag[ij[:, 0], ij[:, 1], z])
            sid.append(np.full(len(ij), gi))
            jit.append(np.broadcast_to(half, (len(ij), 3)))
            centre.append(w.mean(0))
            axes.append(ax)
            sigma.append(sig)
            stack_of.append(si)
            slice_in.append(z)
    f32 = dict(dtype=torch.float32, device=device)
    return SliceData(
        x0=torch.as_tensor(np.concatenate(x0), **f32),
        y=torch.as_tensor(np.concatenate(y), **f32),
        slice_idx=torch.as_tensor(np.concatenate(sid), dtype=torch.int64, device=device),
        grad_mag=torch.as_tensor(np.concatenate(grad), **f32),
        jitter_mm=torch.as_tensor(np.concatenate(jit), **f32),
        centre=torch.as_tensor(np.stack(centre), **f32),
        axes=torch.as_tensor(np.stack(axes), **f32),
        psf_sigma=torch.as_tensor(np.array(sigma), **f32),
        stack_of_slice=np.array(stack_of),
        slice_in_stack=np.array(slice_in),
        origin_mm=origin,
        intensity_scale=scale,
        stack_names=[s.name for s in stacks],
        pixel_ij=torch.as_tensor(np.concatenate(pix), dtype=torch.int64, device=device),
    )


def slice_axes(affine: np.ndarray) -> np.ndarray:
    """[3, 3] orthonormal slice frame of a stack (columns: in-plane x, in-plane y, unit normal)."""
    lin = affine[:3, :3]
    ex = lin[:, 0] / np.linalg.norm(lin[:, 0])
    normal = np.cross(lin[:, 0], lin[:, 1])
    normal /= np.linalg.norm(normal)
    return np.stack([ex, np.cross(normal, ex), normal], axis=1)


def _world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return ijk @ affine[:3, :3].T + affine[:3, 3]


class SliceMotion(nn.Module):
    """Per-slice rigid motion about the slice centre and per-slice intensity scale.

    x = R_i (x0 - c_i) + c_i + t_i, with R_i from the axis-angle vector ``rotvec[i]``.
    """

    def __init__(self, n_slices: int, device: torch.device) -> None:
        super().__init__()
        self.rotvec = nn.Parameter(torch.zeros(n_slices, 3, device=device))  # [M, 3] radians
        self.trans = nn.Parameter(torch.zeros(n_slices, 3, device=device))  # [M, 3] mm
        self.log_scale = nn.Parameter(torch.zeros(n_slices, device=device))  # [M]

    def rotation(self) -> Tensor:
        return axis_angle_to_matrix(self.rotvec)  # [M, 3, 3]

    def psf_cov(self, data: SliceData, rotation: Tensor) -> Tensor:
        """[M, 3, 3] world PSF covariance of each slice, rotated with the slice."""
        return psf_covariance_world(rotation @ data.axes, data.psf_sigma)


def transform_points(x0: Tensor, sid: Tensor, centre: Tensor, rotation: Tensor, trans: Tensor) -> Tensor:
    """Apply each pixel's slice motion: [P, 3] -> [P, 3]."""
    c = centre[sid]
    return (rotation[sid] @ (x0 - c)[:, :, None])[:, :, 0] + c + trans[sid]


def _alignments(data: SliceData, stacks: Sequence[Stack]) -> tuple[np.ndarray, np.ndarray]:
    """[M, 3, 3], [M, 3]: the rotation Q and translation q that stack alignment applied to each slice's header."""
    eye = np.eye(4)
    a = np.stack([eye if s.alignment is None else s.alignment for s in stacks])[data.stack_of_slice]
    return a[:, :3, :3], a[:, :3, 3]


def header_motion(data: SliceData, motion: SliceMotion, stacks: Sequence[Stack]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each slice's motion relative to its stack's *input* header, in world mm (float64):
    x_anatomy = R (x - c) + c + t for a pixel at world position x under the input affine, with c the slice
    centre there. Stack alignment (``Stack.alignment``) is folded in. Returns R [M, 3, 3], c [M, 3], t [M, 3]."""
    q_rot, q_t = _alignments(data, stacks)
    with torch.no_grad():
        rot = motion.rotation().double().cpu().numpy()
        trans = motion.trans.double().cpu().numpy()
    c_aligned = data.centre.double().cpu().numpy() + data.origin_mm
    centre = np.einsum("mji,mj->mi", q_rot, c_aligned - q_t)  # Q^T (c - q): the centre under the input header
    return rot @ q_rot, centre, c_aligned + trans - centre


def set_header_motion(data: SliceData, motion: SliceMotion, stacks: Sequence[Stack], rot: np.ndarray, centre: np.ndarray,
                      trans: np.ndarray) -> None:
    """The inverse of :func:`header_motion`: set ``motion`` from motions relative to the input headers
    (x_anatomy = rot (x - centre) + centre + trans, world mm; [M, 3, 3], [M, 3], [M, 3] in slice order)."""
    q_rot, q_t = _alignments(data, stacks)
    r = rot @ np.transpose(q_rot, (0, 2, 1))  # in the aligned header's frame: x = Q^T (x_aligned - q)
    c_al = np.einsum("mij,mj->mi", q_rot, centre) + q_t
    t_al = centre + trans - c_al
    c_data = data.centre.double().cpu().numpy() + data.origin_mm
    t_data = t_al + np.einsum("mij,mj->mi", r, c_data - c_al) - (c_data - c_al)
    with torch.no_grad():
        motion.rotvec.copy_(matrix_to_axis_angle(torch.from_numpy(r)).float())
        motion.trans.copy_(torch.from_numpy(t_data).float())


#: the columns that name a slice in a slice table
MOTION_KEY = ["stack_index", "slice_index"]


#: the columns of a slice table that give a slice's motion (with ``MOTION_KEY``)
MOTION_COLUMNS = ["rx_deg", "ry_deg", "rz_deg", "cx_mm", "cy_mm", "cz_mm", "tx_mm", "ty_mm", "tz_mm"]


def read_slice_table(path: str | os.PathLike) -> pd.DataFrame:
    """A slice table (``slices.tsv`` of a reconstruction, ``motions.tsv`` of a simulation) read from ``path``;
    a missing or unreadable file, a missing column or a non-finite motion is a :class:`GsvrError` naming it."""
    try:
        table = pd.read_csv(path, sep="\t")
    except FileNotFoundError:
        raise GsvrError(f"{path}: slice table does not exist") from None
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise GsvrError(f"{path}: not a readable slice table ({type(exc).__name__}: {' '.join(str(exc).split())})") from None
    missing = [c for c in MOTION_KEY + MOTION_COLUMNS if c not in table.columns]
    if missing:
        raise GsvrError(f"{path}: not a slice table of gsvr (slices.tsv): missing columns {', '.join(missing)}")
    values = table[MOTION_KEY + MOTION_COLUMNS].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    if not np.isfinite(values).all():
        raise GsvrError(f"{path}: slice table has missing or non-finite motion values")
    return table


def table_motion(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """R [M, 3, 3], c [M, 3], t [M, 3] of each row of a slice table (``slices.tsv`` format)."""
    rot = Rotation.from_rotvec(np.radians(table[["rx_deg", "ry_deg", "rz_deg"]].to_numpy(float))).as_matrix()
    return rot, table[["cx_mm", "cy_mm", "cz_mm"]].to_numpy(float), table[["tx_mm", "ty_mm", "tz_mm"]].to_numpy(float)


def set_motion_from_table(data: SliceData, motion: SliceMotion, stacks: Sequence[Stack], table: pd.DataFrame) -> None:
    """Set every slice's motion from a slice table (``slices.tsv`` of an earlier run, or a simulation's true
    motions), matched by stack and slice index; a slice the table lacks is an error."""
    missing = [c for c in MOTION_KEY + MOTION_COLUMNS if c not in table.columns]
    if missing:
        raise GsvrError(f"slice motion table: missing columns {', '.join(missing)}")
    rows = table.set_index(MOTION_KEY)
    wanted = pd.MultiIndex.from_arrays([data.stack_of_slice, data.slice_in_stack], names=MOTION_KEY)
    absent = wanted.difference(rows.index)
    if len(absent):
        raise GsvrError(f"slice motion table: no row for {len(absent)} slices, e.g. stack {absent[0][0]} slice {absent[0][1]}")
    set_header_motion(data, motion, stacks, *table_motion(rows.loc[wanted].reset_index()))


def downsample_inplane(stack: Stack, factor: int = 2) -> Stack:
    """The stack with ``factor`` x ``factor`` in-plane blocks averaged (GaussianSVR's coarse level): the
    affine's in-plane axes grow by ``factor`` and its origin moves to the first block's centre; a block
    is in the mask when most of it is; slices and thickness are kept."""
    nx, ny, nz = (stack.data.shape[0] // factor) * factor, (stack.data.shape[1] // factor) * factor, stack.data.shape[2]
    if nx == 0 or ny == 0:
        raise GsvrError(f"{stack.label}: too small to downsample in plane by {factor}")

    def blocks(a: np.ndarray) -> np.ndarray:
        return a[:nx, :ny].reshape(nx // factor, factor, ny // factor, factor, nz).mean((1, 3))

    affine = stack.affine.copy()
    affine[:3, 3] += (factor - 1) / 2 * (affine[:3, 0] + affine[:3, 1])
    affine[:3, :2] *= factor
    return dataclasses.replace(stack, data=blocks(stack.data.astype(np.float32)), mask=blocks(stack.mask.astype(np.float32)) > 0.5,
                               affine=affine)


def motion_about_centres(motion: SliceMotion, centre: Tensor, new_centre: Tensor, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The motions of slices ``rows`` re-expressed about other slice centres [len(rows), 3]: the same rigid
    map x -> R (x - c) + c + t written as R (x - c') + c' + t' with t' = t + (R - I)(c' - c). Returns
    (rotvec, trans, log_scale) for those slices."""
    with torch.no_grad():
        rot = motion.rotation()[rows]
        d = new_centre - centre[rows]
        trans = motion.trans[rows] + (rot @ d[:, :, None])[:, :, 0] - d
        return motion.rotvec[rows].clone(), trans, motion.log_scale[rows].clone()

