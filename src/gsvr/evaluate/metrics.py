"""The evaluation protocol used for every figure of the project.

1. The reconstruction is rigidly registered to the ground truth (SimpleITK, Euler 3D,
   normalised correlation inside the ground-truth mask, multi-resolution), which removes
   the global pose SVR cannot know, and resampled (linear) onto the ground-truth grid
   through world coordinates.
2. A linear intensity fit a*R + b to the ground truth inside the mask (least squares).
3. Both divided by the ground truth's maximum inside the mask.
4. Inside the mask: PSNR (peak 1), SSIM (scikit-image, data_range 1, mean of the SSIM map
   inside the mask), NCC (Pearson), NRMSE = ||R - G|| / ||G||.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
from skimage.metrics import structural_similarity

from gsvr.errors import GsvrError


@dataclass
class EvaluationResult:
    psnr: float
    ssim: float
    ncc: float
    nrmse: float
    registration_rotation_deg: float  #: rotation angle of the pose removed by registration
    registration_translation_mm: float  #: displacement of the mask centroid by that pose

    def to_dict(self) -> dict:
        return asdict(self)


def to_sitk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """numpy [X, Y, Z] + RAS affine -> SimpleITK image (ITK is LPS: flip the first two world axes)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0)), dtype=np.float32))
    lps = np.diag([-1.0, -1.0, 1.0])
    lin = lps @ affine[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lin / spacing).flatten().tolist())
    img.SetOrigin((lps @ affine[:3, 3]).tolist())
    return img


def register_rigid(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image) -> sitk.Transform:
    """Rigid registration of moving onto fixed (Euler 3D, correlation, 3 levels)."""
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=200, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SetInitialTransform(init, inPlace=False)
    return reg.Execute(fixed, moving)


def align_to_reference(recon: np.ndarray, recon_affine: np.ndarray, gt: np.ndarray, gt_affine: np.ndarray,
                       mask: np.ndarray) -> sitk.Transform:
    """Step 1 of the protocol: the rigid transform (reference points -> reconstruction points, LPS)
    that registers the reconstruction to the reference inside the mask."""
    mask_img = sitk.Cast(to_sitk((mask > 0).astype(np.float32), gt_affine), sitk.sitkUInt8)
    return register_rigid(to_sitk(gt, gt_affine), to_sitk(recon, recon_affine), mask_img)


def evaluate_volume(
    recon: np.ndarray, recon_affine: np.ndarray, gt: np.ndarray, gt_affine: np.ndarray, mask: np.ndarray, *, register: bool = True
) -> EvaluationResult:
    """Apply the protocol above (module docstring). ``mask`` lies on the reference's grid."""
    m = mask > 0
    if m.shape != gt.shape:
        raise GsvrError(f"reference mask shape {m.shape} differs from the reference's {gt.shape}")
    if not m.any():
        raise GsvrError("reference mask is empty")
    fixed = to_sitk(gt, gt_affine)
    moving = to_sitk(recon, recon_affine)
    unmoved = np.transpose(sitk.GetArrayFromImage(sitk.Resample(moving, fixed, sitk.Euler3DTransform(), sitk.sitkLinear,
                                                                0.0, sitk.sitkFloat32)), (2, 1, 0))
    if not np.any(unmoved[m] != 0):
        raise GsvrError("the reconstruction is zero everywhere inside the reference mask (it does not overlap the "
                        "reference in world space, or it is empty)")
    tx = align_to_reference(recon, recon_affine, gt, gt_affine, m) if register else sitk.Euler3DTransform()
    resampled = sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    r = np.transpose(sitk.GetArrayFromImage(resampled), (2, 1, 0)).astype(np.float64)
    g = gt.astype(np.float64)
    design = np.stack([r[m], np.ones(m.sum())], 1)
    (a, b), *_ = np.linalg.lstsq(design, g[m], rcond=None)
    r = a * r + b
    peak = g[m].max()
    r, g = r / peak, g / peak
    r = np.where(m, r, 0.0)
    g = np.where(m, g, 0.0)
    mse = np.mean((r[m] - g[m]) ** 2)
    _, ssim_map = structural_similarity(g, r, data_range=1.0, full=True)
    rot_deg, shift_mm = _pose_size(tx, m, gt_affine)
    return EvaluationResult(
        psnr=float(10 * np.log10(1.0 / mse)),
        ssim=float(ssim_map[m].mean()),
        ncc=float(np.corrcoef(r[m], g[m])[0, 1]),
        nrmse=float(np.linalg.norm(r[m] - g[m]) / np.linalg.norm(g[m])),
        registration_rotation_deg=rot_deg,
        registration_translation_mm=shift_mm,
    )


def _pose_size(tx: sitk.Transform, m: np.ndarray, affine: np.ndarray) -> tuple[float, float]:
    """Rotation angle (deg) of the transform and the displacement (mm) of the mask centroid."""
    euler = sitk.Euler3DTransform()
    composite = sitk.CompositeTransform(tx) if not isinstance(tx, sitk.CompositeTransform) else tx
    flat = composite.GetNthTransform(composite.GetNumberOfTransforms() - 1) if composite.GetNumberOfTransforms() else euler
    params = sitk.Euler3DTransform(flat) if flat.GetName() == "Euler3DTransform" else euler
    mat = np.array(params.GetMatrix()).reshape(3, 3)
    angle = float(np.degrees(np.arccos(np.clip((np.trace(mat) - 1) / 2, -1, 1))))
    centroid = np.argwhere(m).mean(0) @ affine[:3, :3].T + affine[:3, 3]
    lps = np.array([-centroid[0], -centroid[1], centroid[2]])
    moved = np.array(tx.TransformPoint(lps.tolist()))
    return angle, float(np.linalg.norm(moved - lps))


def evaluate_files(volume: str | os.PathLike, reference: str | os.PathLike, reference_mask: str | os.PathLike, *,
                   output_json: str | os.PathLike | None = None, register: bool = True) -> EvaluationResult:
    """Load a reconstruction, the ground-truth volume and its mask, :func:`evaluate_volume` them and write
    the metrics as JSON (``output_json``, atomically, checked writable before any work) when asked."""
    from gsvr.io.nifti import atomic_output, check_outputs, load_image

    check_outputs({"--output-json": output_json}, inputs=[volume, reference, reference_mask])
    from gsvr.io.nifti import load_mask

    rec, rec_aff = load_image(volume, what="reconstruction")
    gt, gt_aff = load_image(reference, what="reference volume")
    # Through world coordinates: a mask on another grid is resampled onto the reference's (with a warning).
    mask = load_mask(reference_mask, gt.shape, gt_aff, what="reference mask")
    if not mask.any():
        raise GsvrError(f"{reference_mask}: reference mask is empty")
    try:
        result = evaluate_volume(rec, rec_aff, gt, gt_aff, mask, register=register)
    except GsvrError as exc:
        raise GsvrError(f"{volume}: {exc}") from exc
    if output_json is not None:
        with atomic_output(output_json) as tmp:
            tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result
