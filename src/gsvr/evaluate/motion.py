"""Per-slice motion error of a reconstruction against known motions (simulations).

Both motions are slice tables in the format of gsvr's ``slices.tsv`` (and of the simulator's
``motions.tsv``): a pixel at world position x under its stack's input header shows the anatomy at
R (x - c) + c + t. A reconstruction is free to sit anywhere in space (the volume is evaluated after a
rigid registration), so the common rigid pose G that best maps the estimated pixel positions onto
the true ones is removed first. G is a least-squares (Kabsch) fit over every pixel, refitted on the
slices whose error is at most the median plus three median absolute deviations, so a few failed slices
do not tilt it. Then, per slice:

- ``rotation_error_deg``: the angle of R_true^T · R_G · R_est;
- ``displacement_mm``: the mean distance between G(est(x)) and true(x) over the slice's pixels.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
from scipy.spatial.transform import Rotation

from gsvr.recon.slices import MOTION_KEY as KEY, table_motion


def apply(rot: np.ndarray, centre: np.ndarray, trans: np.ndarray, points: np.ndarray) -> np.ndarray:
    """One slice's motion applied to its points [P, 3]."""
    return (points - centre) @ rot.T + centre + trans


def kabsch(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rotation and translation minimising sum w |R src + t - dst|^2."""
    w = np.ones(len(src)) if weights is None else weights
    w = w / w.sum()
    ms, md = w @ src, w @ dst
    u, _, vt = np.linalg.svd(((dst - md) * w[:, None]).T @ (src - ms))
    d = np.sign(np.linalg.det(u @ vt))
    rot = u @ np.diag([1.0, 1.0, d]) @ vt
    return rot, md - rot @ ms


def motion_errors(estimated: pd.DataFrame, true: pd.DataFrame, points: Mapping[tuple[int, int], np.ndarray]) -> pd.DataFrame:
    """Per-slice errors of ``estimated`` against ``true`` after removing the common rigid pose.

    Args:
        estimated: slice table of the reconstruction (rows of slices it kept).
        true: slice table of the true motions (at least the slices of ``estimated``).
        points: (stack_index, slice_index) -> [P, 3] world positions of the slice's pixels under the input header.

    Returns one row per slice of ``estimated``: stack_index, slice_index, rotation_error_deg, displacement_mm and,
    when ``estimated`` has them, weight.
    """
    est = estimated.set_index(KEY)
    tru = true.set_index(KEY).loc[est.index]
    r_e, c_e, t_e = table_motion(est.reset_index())
    r_t, c_t, t_t = table_motion(tru.reset_index())
    pts = [np.asarray(points[k], float) for k in est.index]
    moved_e = [apply(r_e[i], c_e[i], t_e[i], p) for i, p in enumerate(pts)]
    moved_t = [apply(r_t[i], c_t[i], t_t[i], p) for i, p in enumerate(pts)]
    counts = np.array([len(p) for p in pts])
    src, dst = np.concatenate(moved_e), np.concatenate(moved_t)
    keep = np.ones(len(pts), bool)
    for _ in range(2):  # fit, then refit without the slices far off the common pose
        w = np.repeat(keep / counts, counts)  # every kept slice counts once, whatever its size
        g_rot, g_t = kabsch(src, dst, w)
        disp = np.array([np.linalg.norm(e @ g_rot.T + g_t - t, axis=1).mean() for e, t in zip(moved_e, moved_t)])
        med = np.median(disp)
        keep = disp <= med + 3 * np.median(np.abs(disp - med)) + 1e-9
    rel = np.einsum("mji,jk,mkl->mil", r_t, g_rot, r_e)  # R_true^T R_G R_est
    angle = np.degrees(Rotation.from_matrix(rel).magnitude())
    out = est.reset_index()[KEY].copy()
    out["rotation_error_deg"] = angle
    out["displacement_mm"] = disp
    if "weight" in est.columns:
        out["weight"] = est["weight"].to_numpy()
    return out


def summarise(errors: pd.DataFrame, *, bad_rotation_deg: float = 5.0) -> dict:
    """Median, p90 and max of both errors, and the largest weight kept by a slice whose rotation error
    exceeds ``bad_rotation_deg`` (0 when there is none, NaN without weights)."""
    out = {}
    for col, short in (("rotation_error_deg", "rot"), ("displacement_mm", "disp")):
        v = errors[col].to_numpy()
        out.update({f"{short}_median": float(np.median(v)), f"{short}_p90": float(np.percentile(v, 90)),
                    f"{short}_max": float(v.max())})
    bad = errors["rotation_error_deg"] > bad_rotation_deg
    out["n_bad"] = int(bad.sum())
    out["bad_max_weight"] = float(errors.loc[bad, "weight"].max()) if "weight" in errors and bad.any() else (
        0.0 if "weight" in errors else float("nan"))
    return out


def slice_points(stacks, *, step: int = 2) -> dict[tuple[int, int], np.ndarray]:
    """(stack_index, slice_index) -> world positions [P, 3] of every ``step``-th in-mask pixel (both in-plane
    axes; every pixel of a slice too small for that) of each slice of ``stacks`` (:class:`gsvr.io.nifti.Stack`,
    input headers)."""
    out = {}
    for k, s in enumerate(stacks):
        for z in range(s.n_slices):
            ij = np.argwhere(s.mask[::step, ::step, z]) * step
            if not len(ij):
                ij = np.argwhere(s.mask[:, :, z])
            if len(ij):
                ijk = np.concatenate([ij, np.full((len(ij), 1), z)], 1)
                out[(k, z)] = ijk @ s.affine[:3, :3].T + s.affine[:3, 3]
    return out
