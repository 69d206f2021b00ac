"""Initial rigid alignment of whole stacks to a reference stack, without learned weights.

Stacks of a clinical session are acquired minutes apart and the fetal head can turn by tens of
degrees between them; slice-level SVR only corrects a few degrees. Every stack is registered
rigidly (SimpleITK, correlation inside the masks, grown in plane) to the reference stack, starting from a
set of rotations about the brain centre (multi-start); the header and the best starts are refined into
candidate poses, and the poses kept are those on which the stacks agree pairwise (:func:`choose_jointly`).
The result is applied to each stack's affine, so the reconstruction starts with the stacks overlapping and
comes out in the reference stack's frame.

The reference is the stack with the least inter-slice motion: the highest mean normalised
correlation between neighbouring in-mask slices.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from gsvr.evaluate.metrics import to_sitk
from gsvr.io.nifti import Stack

log = logging.getLogger(__name__)

_LPS = np.diag([-1.0, -1.0, 1.0])


def interslice_consistency(stack: Stack) -> float:
    """Mean NCC between neighbouring slices over the union of their masks (higher: less motion)."""
    scores = []
    for k in range(stack.n_slices - 1):
        m = stack.mask[:, :, k] | stack.mask[:, :, k + 1]
        if m.sum() < 20:
            continue
        r = _pearson(stack.data[:, :, k][m], stack.data[:, :, k + 1][m])
        if r is not None:
            scores.append(r)
    return float(np.mean(scores)) if scores else -1.0


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two samples; None when either is constant."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else None


def start_rotations(max_angle_deg: float = 90.0, step_deg: float = 45.0) -> list[np.ndarray]:
    """Start rotations ([3, 3] matrices): rotation vectors on a cubic lattice of spacing
    ``step_deg`` inside the ball of radius ``max_angle_deg`` (plus the ball's boundary reached
    along the lattice directions). Any rotation within ``max_angle_deg`` is then within about
    step * sqrt(3) / 2 of a start, the identity first."""
    n = int(np.floor(max_angle_deg / step_deg + 0.5)) if step_deg > 0 else 0
    pts = [np.array(p, dtype=float) * step_deg for p in itertools.product(range(-n, n + 1), repeat=3)]
    pts = [p for p in pts if np.linalg.norm(p) <= max_angle_deg + step_deg / 2]
    pts.sort(key=lambda p: (np.linalg.norm(p), tuple(p)))
    return [Rotation.from_rotvec(np.radians(p)).as_matrix() for p in pts]


def _masked_image(stack: Stack, spacing_mm: float | None = None) -> tuple[sitk.Image, sitk.Image]:
    """The stack and its mask as SimpleITK images, optionally resampled to isotropic ``spacing_mm``
    (thick-slice stacks: a shrink factor would also shrink the few slices)."""
    img = to_sitk(stack.data, stack.affine)
    mask = sitk.Cast(to_sitk(stack.mask.astype(np.float32), stack.affine) > 0.5, sitk.sitkUInt8)
    if spacing_mm is None:
        return img, mask
    size = [max(int(np.ceil(n * sp / spacing_mm)), 1) for n, sp in zip(img.GetSize(), img.GetSpacing())]
    args = (size, sitk.Transform(), None, img.GetOrigin(), [spacing_mm] * 3, img.GetDirection())
    iso = sitk.Resample(img, args[0], args[1], sitk.sitkLinear, *args[3:], 0.0, img.GetPixelID())
    iso_mask = sitk.Resample(mask, args[0], args[1], sitk.sitkNearestNeighbor, *args[3:], 0, mask.GetPixelID())
    return iso, iso_mask


def _centroid_lps(stack: Stack) -> np.ndarray:
    idx = np.argwhere(stack.mask).mean(0)
    return _LPS @ (stack.affine[:3, :3] @ idx + stack.affine[:3, 3])


def _registration(*, iterations: int, fixed_mask, moving_mask, seed: int, step: float = 1.0, sampling: float = 0.25):
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetMetricMovingMask(moving_mask)
    if sampling < 1.0:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(sampling, seed + 1)  # SimpleITK seed 0 means "from the wall clock"
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=step, minStep=1e-4, numberOfIterations=iterations,
                                                 gradientMagnitudeTolerance=1e-8, relaxationFactor=0.7)
    reg.SetOptimizerScalesFromPhysicalShift()
    return reg


def _overlap_correlation(fixed: sitk.Image, fixed_mask: np.ndarray, moving: sitk.Image, tx: sitk.Transform) -> float:
    """Pearson correlation over *all* fixed-mask voxels of the moving image mapped by ``tx``, with 0
    outside the moving image: unlike the optimiser's metric (valid points only), a start that
    slides the brain out of the overlap cannot score well."""
    warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0))[fixed_mask]
    r = _pearson(warped, sitk.GetArrayFromImage(fixed)[fixed_mask])
    return -1.0 if r is None else r


def stack_candidates(fixed: Stack, moving: Stack, *, max_angle_deg: float = 90.0, step_deg: float = 45.0, top: int = 2,
                     seed: int = 0) -> list[tuple[np.ndarray, float]]:
    """Candidate rigid world transforms T [4, 4] (RAS mm, T(moving anatomy) = fixed anatomy), each with the
    correlation over the fixed mask it reaches: first the header geometry refined (always there; NaN
    correlation when its refinement lost the overlap), then up to ``top`` best starts.

    Every start rotation (about the moving mask's centroid, after aligning the centroids) gets a short
    registration on an isotropic grid at the coarsest stack spacing; the header and the ``top`` best starts are
    refined at the in-plane spacing."""
    coarse = float(max(fixed.spacing_mm.max(), moving.spacing_mm.max()))
    fine = max(float(max(fixed.spacing_mm[:2].max(), moving.spacing_mm[:2].max())), coarse / 2)
    f_coarse, f_coarse_mask = _masked_image(fixed, coarse)
    f_fine, f_fine_mask = _masked_image(fixed, fine)
    m_img, m_mask = _masked_image(moving)
    coarse_mask_np = sitk.GetArrayFromImage(f_coarse_mask) > 0
    fine_mask_np = sitk.GetArrayFromImage(f_fine_mask) > 0
    c_fixed, c_moving = _centroid_lps(fixed), _centroid_lps(moving)
    trials = []
    for rot in start_rotations(max_angle_deg, step_deg):
        tx = sitk.Euler3DTransform()
        tx.SetCenter(c_fixed.tolist())
        tx.SetMatrix(rot.ravel().tolist())
        tx.SetTranslation((c_moving - c_fixed).tolist())
        reg = _registration(iterations=60, fixed_mask=f_coarse_mask, moving_mask=m_mask, seed=seed, step=2.0)
        reg.SetInitialTransform(tx, inPlace=True)
        try:
            reg.Execute(f_coarse, m_img)
        except RuntimeError:  # no overlap left for this start
            continue
        trials.append((-_overlap_correlation(f_coarse, coarse_mask_np, m_img, tx), tx))
    header = sitk.Euler3DTransform()
    header.SetCenter(c_fixed.tolist())
    refined = []
    for tx in [header] + [t for _, t in sorted(trials, key=lambda t: t[0])[:top]]:
        reg = _registration(iterations=200, fixed_mask=f_fine_mask, moving_mask=m_mask, seed=seed)
        reg.SetInitialTransform(tx, inPlace=True)
        try:
            reg.Execute(f_fine, m_img)
        except RuntimeError:  # no overlap left: the header stays a candidate, unrefined (correlation NaN)
            if tx is header:
                refined.append((np.eye(4), float("nan")))
            continue
        refined.append((np.linalg.inv(_fixed_to_moving_ras(tx)), _overlap_correlation(f_fine, fine_mask_np, m_img, tx)))
    return refined


def _fixed_to_moving_ras(tx: sitk.Transform) -> np.ndarray:
    """A SimpleITK rigid/affine transform (fixed points to moving points, LPS: p_m = A p_f + t) in RAS [4, 4]."""
    a = np.array(tx.GetMatrix()).reshape(3, 3)
    t = np.array(tx.GetTranslation()) + np.array(tx.GetCenter()) - a @ np.array(tx.GetCenter())
    out = np.eye(4)
    out[:3, :3] = _LPS @ a @ _LPS
    out[:3, 3] = _LPS @ t
    return out


def _sitk_transform(fixed_to_moving: np.ndarray) -> sitk.AffineTransform:
    """The inverse of :func:`_fixed_to_moving_ras`: a RAS map of fixed points to moving points as SimpleITK's."""
    tx = sitk.AffineTransform(3)
    tx.SetMatrix((_LPS @ fixed_to_moving[:3, :3] @ _LPS).ravel().tolist())
    tx.SetTranslation((_LPS @ fixed_to_moving[:3, 3]).tolist())
    return tx


def register_stack(fixed: Stack, moving: Stack, *, max_angle_deg: float = 90.0, step_deg: float = 45.0,
                   top: int = 2, margin: float = 0.1, seed: int = 0) -> tuple[np.ndarray, float]:
    """Rigid world transform T [4, 4] (RAS mm) with T(moving anatomy) = fixed anatomy, and the negated
    correlation over the fixed mask it reaches: the best of :func:`stack_candidates`, where a far start must
    beat the refined header geometry by ``margin`` in correlation (the brain is nearly symmetric: flipped poses
    correlate well when slices are motion-corrupted)."""
    (header, header_corr), *starts = stack_candidates(fixed, moving, max_angle_deg=max_angle_deg, step_deg=step_deg,
                                                      top=top, seed=seed)
    failed = not np.isfinite(header_corr)  # the header's refinement lost the overlap
    if not starts:
        return (np.eye(4), 0.0) if failed else (header, -float(header_corr))
    best, corr = max(starts, key=lambda c: c[1])
    if not failed and corr < header_corr + margin:
        best, corr = header, header_corr
    return best, -float(corr)


class _PlacedStacks:
    """Correlations between stacks placed in the reference's frame (each by one of its candidate transforms),
    computed on demand and kept: the image of one stack on its own isotropic grid at its in-plane spacing (at
    least half its slice spacing), the other stack mapped onto it, over the first one's mask."""

    def __init__(self, stacks: Sequence[Stack], candidates: Sequence[Sequence[np.ndarray]]):
        self.candidates = candidates
        self.images = []
        for s in stacks:
            fine, fine_mask = _masked_image(s, max(float(s.spacing_mm[:2].max()), float(s.spacing_mm.max()) / 2))
            self.images.append((fine, sitk.GetArrayFromImage(fine_mask) > 0, _masked_image(s)[0]))
        self._cache: dict[tuple[int, int, int, int], float] = {}

    def correlation(self, i: int, k: int, j: int, l: int) -> float:
        """Symmetric: the mean of stack i (candidate k) seen from stack j (candidate l) and the converse."""
        return 0.5 * (self._one_way(i, k, j, l) + self._one_way(j, l, i, k))

    def _one_way(self, i: int, k: int, j: int, l: int) -> float:
        key = (i, k, j, l)
        if key not in self._cache:
            fixed, mask, _ = self.images[j]
            moving = self.images[i][2]
            # A point of stack j's world goes to the common frame by its transform, back into stack i's by i's inverse.
            fixed_to_moving = np.linalg.inv(self.candidates[i][k]) @ self.candidates[j][l]
            self._cache[key] = _overlap_correlation(fixed, mask, moving, _sitk_transform(fixed_to_moving))
        return self._cache[key]


def choose_jointly(stacks: Sequence[Stack], candidates: Sequence[Sequence[np.ndarray]], reference: int, *,
                   reference_weight: float = 2.0, margin: float = 0.1, sweeps: int = 10) -> list[int]:
    """One candidate per stack (``candidates[reference]`` is the identity alone; every other stack's first
    candidate is its header geometry) that makes the stacks agree: the choice maximising the sum over pairs of
    stacks of their correlation where placed, a pair with the reference weighted ``reference_weight``.
    Coordinate ascent (one stack at a time, the others held; a stack moves only to a strictly better candidate),
    started from each stack's best correlation with the reference alone.

    A flipped pose of one thick-slice stack can correlate with the reference better than the right one (the
    brain is nearly symmetric and the slices are motion-corrupted), but it disagrees with every other stack.
    With two stacks there is no other witness: a far candidate must then beat the header by ``margin``, as in
    :func:`register_stack`."""
    placed = _PlacedStacks(stacks, candidates)
    others = [i for i in range(len(stacks)) if i != reference]

    def score(i: int, k: int, choice: list[int]) -> float:
        return sum((reference_weight if j == reference else 1.0) * placed.correlation(i, k, j, choice[j])
                   for j in range(len(stacks)) if j != i)

    choice = [0] * len(stacks)
    for i in others:
        with_reference = [placed.correlation(i, k, reference, 0) for k in range(len(candidates[i]))]
        choice[i] = int(np.argmax(with_reference))
        if len(others) == 1 and with_reference[choice[i]] < with_reference[0] + margin:
            choice[i] = 0
    if len(others) < 2:
        return choice
    for _ in range(sweeps):
        changed = False
        for i in others:
            scores = [score(i, k, choice) for k in range(len(candidates[i]))]
            best = int(np.argmax(scores))
            if scores[best] > scores[choice[i]]:
                choice[i], changed = best, True
        if not changed:
            break
    else:
        log.info("stack poses: the joint choice still changed after %d sweeps; kept the last", sweeps)
    return choice


def align_stacks(stacks: Sequence[Stack], *, reference: int | None = None, max_angle_deg: float = 90.0,
                 step_deg: float = 45.0, top: int = 4, mask_dilation_mm: float = 0.0,
                 seed: int = 0) -> tuple[list[Stack], int]:
    """Register every stack to the reference (default: best inter-slice consistency, on the grown masks);
    returns the stacks with updated affines and the reference index.

    Each stack gets candidate poses against the reference (:func:`stack_candidates`: the header refined and
    the ``top`` best starts), with masks grown in plane by ``mask_dilation_mm`` for the registration (the
    brain's boundary against its surroundings then counts; the returned stacks keep their masks); the poses
    kept are the ones on which all stacks agree (:func:`choose_jointly`)."""
    from gsvr.preprocess.stacks import dilate_masks_inplane

    grown = dilate_masks_inplane(stacks, mask_dilation_mm)
    if reference is None:
        scores = [interslice_consistency(s) for s in grown]
        reference = int(np.argmax(scores))
        log.info("reference stack %s (inter-slice NCC %s)", stacks[reference].name, ", ".join(f"{v:.3f}" for v in scores))
    candidates: list[list[np.ndarray]] = []
    for i, s in enumerate(grown):
        found = [] if i == reference else stack_candidates(grown[reference], s, max_angle_deg=max_angle_deg,
                                                           step_deg=step_deg, top=top, seed=seed)
        candidates.append([transform for transform, _ in found] or [np.eye(4)])
    choice = choose_jointly(grown, candidates, reference)
    out = list(stacks)
    for i, s in enumerate(stacks):
        if i == reference:
            continue
        transform = candidates[i][choice[i]]
        angle = np.degrees(Rotation.from_matrix(transform[:3, :3]).magnitude())
        log.info("stack %s -> %s: rotation %.1f deg, translation %.1f mm (candidate %d of %d)",
                 s.name, stacks[reference].name, angle, np.linalg.norm(transform[:3, 3]), choice[i] + 1, len(candidates[i]))
        before = np.eye(4) if s.alignment is None else s.alignment
        out[i] = dataclasses.replace(s, affine=transform @ s.affine, alignment=transform @ before)
    return out, reference
