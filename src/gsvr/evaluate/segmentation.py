"""Segmentation of reconstructions into the FeTA structures, and its scores against a label map.

Segmenters:

* ``atlas`` (default): multi-atlas segmentation with antspyx. Every atlas (a folder with
  ``srr.nii.gz`` and ``parcellation.nii.gz``, e.g. the CC0 fetal atlas) is registered to the
  volume (affine then SyN, both images resampled to ``registration_spacing_mm``: a coarser spacing
  keeps the Dice and saves time, measured in docs/results.md, section 8), its labels are
  carried over, and the labels (background included) are fused by joint label fusion inside
  the dilated union of the carried brain masks (a single atlas: its carried labels as they are). An atlas named
  like the subject is never used on that subject.
* ``nnunet``: a trained nnU-Net v2 model folder, run with ``nnUNetv2_predict_from_modelfolder``;
  its label numbers are mapped to the FeTA ones by ``label_map``.

Scores (M-Gaussian Table 5): per structure Dice, HD95 and ASSD (mm) from SimpleITK's Maurer
distance maps of the two label contours; HD95 is the larger of the two directed 95th
percentiles, ASSD the mean over both contours' points.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import SimpleITK as sitk

from gsvr.errors import GsvrError
from gsvr.evaluate.metrics import to_sitk

log = logging.getLogger(__name__)

#: FeTA structures as the ground-truth label maps number them (the corpus callosum, label 8 in the
#: atlas, is merged into the white matter as FeTA defines it: see ``SegmentationSettings.merge_labels``).
STRUCTURES = {1: "white_matter", 2: "ventricles", 3: "cerebellum", 4: "external_csf", 5: "grey_matter",
              6: "deep_grey_matter", 7: "brainstem"}
#: Columns of a segmentation score table.
SCORE_COLUMNS = ["structure", "dice", "hd95_mm", "assd_mm"]


@dataclass(frozen=True)
class SegmentationSettings:
    """How reconstructions are segmented (the workflow's ``segmentation:`` block)."""

    segmenter: str = "atlas"  #: "atlas" (antspyx multi-atlas + joint label fusion) or "nnunet"
    atlases: tuple[str, ...] = ()  #: atlas folders (srr.nii.gz + parcellation.nii.gz)
    registration_spacing_mm: float = 1.6  #: isotropic spacing the registrations run at
    transform: str = "SyN"  #: antspyx transform (affine + deformable)
    fusion_radius: int = 1  #: joint label fusion patch radius (voxels)
    merge_labels: Mapping[int, int] = field(default_factory=lambda: {8: 1})  #: label -> label before scoring
    nnunet_model: str | None = None  #: nnU-Net v2 trained model folder
    nnunet_folds: tuple[int, ...] = (0,)
    nnunet_label_map: Mapping[int, int] = field(default_factory=dict)  #: model label -> FeTA label (empty: same)
    seed: int = 1

    def __post_init__(self) -> None:
        if self.segmenter not in ("atlas", "nnunet"):
            raise GsvrError(f"segmentation: segmenter must be atlas or nnunet, got {self.segmenter!r}")
        if self.segmenter == "nnunet" and not self.nnunet_model:
            raise GsvrError("segmentation: segmenter nnunet needs nnunet_model (a trained model folder)")
        if not (math.isfinite(self.registration_spacing_mm) and self.registration_spacing_mm > 0):
            raise GsvrError(f"segmentation: registration_spacing_mm must be a finite number > 0, got {self.registration_spacing_mm}")

    @classmethod
    def from_dict(cls, values: Mapping | None) -> "SegmentationSettings":
        values = dict(values or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise GsvrError(f"segmentation: unknown setting(s) {unknown}; known: {sorted(known)}")
        for key in ("atlases", "nnunet_folds"):
            if key in values:
                values[key] = tuple(values[key])
        for key in ("merge_labels", "nnunet_label_map"):
            if key in values:
                values[key] = {int(k): int(v) for k, v in (values[key] or {}).items()}
        return cls(**values)

    def atlases_for(self, subject: str | None) -> list[Path]:
        """The atlas folders used on ``subject``: all but one named like it; each must hold both files."""
        chosen = [Path(a) for a in self.atlases if subject is None or Path(a).name != subject]
        for a in chosen:
            for name in ("srr.nii.gz", "parcellation.nii.gz"):
                if not (a / name).is_file():
                    raise GsvrError(f"{a}: atlas folder has no {name}")
        if not chosen:
            raise GsvrError(f"segmentation: no atlas left for subject {subject} (an atlas is never used on itself)")
        return chosen


def _ants():
    try:
        import ants
    except ImportError as exc:  # an optional dependency: pip install gsvr[workflow] or [segment]
        raise GsvrError("multi-atlas segmentation needs antspyx (pip install antspyx)") from exc
    return ants


def _normalised(img):
    """Intensities divided by the 99th percentile of the non-zero voxels."""
    arr = img.numpy()
    sel = arr[arr > 0]
    peak = float(np.percentile(sel, 99)) if sel.size else 1.0
    return img / (peak if peak > 0 else 1.0)


@contextmanager
def _private_tempdir():
    """Point ``tempfile``'s default folder at a fresh folder removed on exit. antspyx names its
    registration transforms and joint-label-fusion probability maps with ``tempfile.mktemp`` and never
    deletes them: each segmentation would otherwise leave the transforms of every atlas registration and
    one probability map per fused label in /tmp (measured count: docs/results.md, section 8)."""
    previous = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="gsvr-ants-") as tmp:
        tempfile.tempdir = tmp
        try:
            yield tmp
        finally:
            tempfile.tempdir = previous


def segment_multi_atlas(volume_path: str | os.PathLike, atlases: Sequence[str | os.PathLike],
                        settings: SegmentationSettings = SegmentationSettings()) -> tuple[np.ndarray, np.ndarray]:
    """Label map [X, Y, Z] (int16, FeTA numbers before merging) on the volume's own grid, and its affine."""
    with _private_tempdir():
        try:
            return _segment_multi_atlas(volume_path, atlases, settings)
        except RuntimeError as exc:  # ITK's errors (registration failed, memory) span several lines: keep the last
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [exc.__class__.__name__]
            raise GsvrError(f"{volume_path}: multi-atlas segmentation failed ({lines[-1]})") from exc


def _segment_multi_atlas(volume_path: str | os.PathLike, atlases: Sequence[str | os.PathLike],
                         settings: SegmentationSettings) -> tuple[np.ndarray, np.ndarray]:
    ants = _ants()
    import nibabel as nib

    target = _normalised(ants.image_read(str(volume_path), pixeltype="float"))
    sp = (settings.registration_spacing_mm,) * 3
    target_low = ants.resample_image(target, sp, use_voxels=False, interp_type=0)
    warped_images, warped_labels = [], []
    for atlas in atlases:
        atlas = Path(atlas)
        image = _normalised(ants.image_read(str(atlas / "srr.nii.gz"), pixeltype="float"))
        labels = ants.image_read(str(atlas / "parcellation.nii.gz"), pixeltype="float")
        reg = ants.registration(target_low, ants.resample_image(image, sp, use_voxels=False, interp_type=0),
                                type_of_transform=settings.transform, random_seed=settings.seed)
        warped_images.append(ants.apply_transforms(target, image, reg["fwdtransforms"]))
        warped_labels.append(ants.apply_transforms(target, labels, reg["fwdtransforms"], interpolator="nearestNeighbor"))
        log.info("atlas %s registered", atlas.name)
    union = np.zeros(target.shape, dtype=bool)
    for lab in warped_labels:
        union |= lab.numpy() > 0
    mask = ants.iMath(target.new_image_like(union.astype(np.float32)), "MD", 2)
    if len(warped_labels) == 1:  # nothing to fuse (antspyx's joint label fusion needs two atlases at least)
        labels = np.rint(warped_labels[0].numpy()).astype(np.int16)
    else:
        # Background is fused as a label of its own (numbers shifted by one): joint label fusion only
        # chooses among non-zero labels, and would give every masked voxel a brain structure.
        shifted = [lab + 1 for lab in warped_labels]
        fused = ants.joint_label_fusion(target, mask, atlas_list=warped_images, label_list=shifted,
                                        rad=settings.fusion_radius, verbose=False)
        labels = np.clip(np.rint(fused["segmentation"].numpy()) - 1, 0, None).astype(np.int16)
    affine = nib.load(str(volume_path)).affine
    return labels, affine


def nnunet_command(settings: SegmentationSettings, input_dir: Path, output_dir: Path) -> list[str]:
    """The nnU-Net v2 command line predicting every ``*_0000.nii.gz`` of ``input_dir``."""
    return ["nnUNetv2_predict_from_modelfolder", "-i", str(input_dir), "-o", str(output_dir), "-m",
            str(settings.nnunet_model), "-f", *[str(f) for f in settings.nnunet_folds]]


def segment_nnunet(volume_path: str | os.PathLike, settings: SegmentationSettings) -> tuple[np.ndarray, np.ndarray]:
    """Label map from a trained nnU-Net v2 model folder, mapped to FeTA numbers."""
    import nibabel as nib

    if shutil.which("nnUNetv2_predict_from_modelfolder") is None:
        raise GsvrError("segmenter nnunet: nnUNetv2_predict_from_modelfolder not found on PATH (pip install nnunetv2)")
    with tempfile.TemporaryDirectory(prefix="gsvr-nnunet-") as tmp:
        inp, out = Path(tmp, "in"), Path(tmp, "out")
        inp.mkdir()
        shutil.copyfile(volume_path, inp / "case_0000.nii.gz")
        res = subprocess.run(nnunet_command(settings, inp, out), capture_output=True, text=True)
        if res.returncode != 0 or not (out / "case.nii.gz").is_file():
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
            raise GsvrError(f"{volume_path}: nnU-Net prediction failed ({tail[0]})")
        img = nib.load(str(out / "case.nii.gz"))
        labels = np.asarray(img.dataobj).astype(np.int16)
        affine = img.affine
    return map_labels(labels, settings.nnunet_label_map), affine


def map_labels(labels: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Renumber labels (simultaneously: a -> b and b -> c does not chain)."""
    out = labels.copy()
    for src, dst in mapping.items():
        out[labels == src] = dst
    return out


def segment(volume_path: str | os.PathLike, settings: SegmentationSettings, *, subject: str | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Segment a volume with the configured segmenter; labels merged per ``merge_labels``."""
    if settings.segmenter == "nnunet":
        labels, affine = segment_nnunet(volume_path, settings)
    else:
        labels, affine = segment_multi_atlas(volume_path, settings.atlases_for(subject), settings)
    return map_labels(labels, settings.merge_labels), affine


def resample_labels(labels: np.ndarray, affine: np.ndarray, ref_shape: Sequence[int], ref_affine: np.ndarray,
                    transform: sitk.Transform | None = None) -> np.ndarray:
    """Nearest-neighbour resampling of a label map onto a reference grid through world coordinates
    (``transform`` maps reference points to label-map points, as SimpleITK's Resample expects)."""
    moving = to_sitk(labels.astype(np.float32), affine)
    ref = to_sitk(np.zeros(tuple(ref_shape), np.float32), ref_affine)
    out = sitk.Resample(moving, ref, transform or sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
    return np.rint(np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))).astype(np.int16)


def _directed_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from the contour voxels of ``a`` to the contour of ``b``, and the other way."""
    def contour(m):
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(m, (2, 1, 0))).astype(np.uint8))
        img.SetSpacing([float(s) for s in spacing])
        return sitk.LabelContour(img, fullyConnected=True)

    def distance(c):
        return np.abs(sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(c, squaredDistance=False, useImageSpacing=True)))

    ca, cb = contour(a), contour(b)
    return distance(cb)[sitk.GetArrayFromImage(ca) > 0], distance(ca)[sitk.GetArrayFromImage(cb) > 0]


def score_segmentation(pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float],
                       structures: Mapping[int, str] = STRUCTURES) -> pd.DataFrame:
    """Dice, HD95 and ASSD (mm) per structure on one grid, then their ``mean`` row; a structure missing
    from the prediction scores Dice 0 and NaN distances (the mean of the distances skips it)."""
    rows = []
    for label, name in structures.items():
        p, t = pred == label, truth == label
        denom = p.sum() + t.sum()
        dice = 2.0 * (p & t).sum() / denom if denom else np.nan
        if p.any() and t.any():
            d_pt, d_tp = _directed_distances(p, t, spacing_mm)
            hd95 = max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))
            assd = (d_pt.sum() + d_tp.sum()) / (len(d_pt) + len(d_tp))
        else:
            hd95 = assd = np.nan
        rows.append({"structure": name, "dice": float(dice), "hd95_mm": float(hd95), "assd_mm": float(assd)})
    df = pd.DataFrame(rows, columns=SCORE_COLUMNS)
    mean = {"structure": "mean", **{c: float(df[c].mean()) for c in SCORE_COLUMNS[1:]}}
    return pd.concat([df, pd.DataFrame([mean])], ignore_index=True)


def segment_file(volume_path: str | os.PathLike, output_labels: str | os.PathLike, settings: SegmentationSettings, *,
                 subject: str | None = None) -> np.ndarray:
    """Segment a NIfTI volume and write the label map (int16, the volume's grid; atomic)."""
    from gsvr.io.nifti import check_outputs, load_image, save_mask

    atlas_files = [Path(a) / name for a in settings.atlases for name in ("srr.nii.gz", "parcellation.nii.gz")]
    check_outputs({"--output-labels": output_labels}, inputs=[volume_path, *atlas_files], nifti=["--output-labels"])
    load_image(volume_path, what="volume")  # clear error for a missing, unreadable or non-3D file
    labels, affine = segment(volume_path, settings, subject=subject)
    save_mask(output_labels, labels, affine, dtype=np.int16)
    return labels


def evaluate_segmentation_files(labels_path: str | os.PathLike, truth_path: str | os.PathLike, *,
                                merge_labels: Mapping[int, int], volume_path: str | os.PathLike | None = None,
                                reference_path: str | os.PathLike | None = None,
                                mask_path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Score a label map against the ground-truth labels on the ground truth's grid.

    With ``volume_path`` (the segmented reconstruction), ``reference_path`` and ``mask_path``, the
    labels are carried through the rigid pose that registers the reconstruction to the reference
    (the intensity evaluation's step 1); without them, through world coordinates only.
    """
    from gsvr.evaluate.metrics import align_to_reference
    from gsvr.io.nifti import load_image

    labels, lab_aff = load_image(labels_path, what="label map")
    truth, t_aff = load_image(truth_path, what="ground-truth label map")
    transform = None
    if volume_path is not None:
        rec, rec_aff = load_image(volume_path, what="reconstruction")
        ref, ref_aff = load_image(reference_path, what="reference volume")
        mask, _ = load_image(mask_path, what="reference mask")
        transform = align_to_reference(rec, rec_aff, ref, ref_aff, mask)
    pred = resample_labels(np.rint(labels).astype(np.int16), lab_aff, truth.shape, t_aff, transform)
    truth = map_labels(np.rint(truth).astype(np.int16), merge_labels)
    return score_segmentation(map_labels(pred, merge_labels), truth, np.linalg.norm(t_aff[:3, :3], axis=0))


def write_segmentation_scores(labels_path: str | os.PathLike, truth_path: str | os.PathLike,
                              output_tsv: str | os.PathLike, *, settings: SegmentationSettings | Mapping | None = None,
                              volume_path: str | os.PathLike | None = None,
                              reference_path: str | os.PathLike | None = None,
                              mask_path: str | os.PathLike | None = None) -> pd.DataFrame:
    """:func:`evaluate_segmentation_files` with the label merges of ``settings`` (a
    :class:`SegmentationSettings` or its plain mapping), the scores written to ``output_tsv`` (TSV,
    atomically, checked writable before any work)."""
    from gsvr.io.nifti import atomic_output, check_writable

    if not isinstance(settings, SegmentationSettings):
        settings = SegmentationSettings.from_dict(settings)
    check_writable(output_tsv)
    scores = evaluate_segmentation_files(labels_path, truth_path, merge_labels=settings.merge_labels,
                                         volume_path=volume_path, reference_path=reference_path, mask_path=mask_path)
    with atomic_output(output_tsv) as tmp:
        scores.to_csv(tmp, sep="\t", index=False, float_format="%.5g")
    return scores
