"""Segmentation evaluation: surface-distance scores, settings, the nnU-Net command and the multi-atlas segmenter."""

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from gsvr.errors import GsvrError
from gsvr.evaluate.segmentation import (STRUCTURES, SegmentationSettings, evaluate_segmentation_files, map_labels,
                                        nnunet_command, resample_labels, score_segmentation, segment_file)

ROOT = Path(__file__).resolve().parents[2]
ATLASES = (str(ROOT / "data/atlases/GA22"), str(ROOT / "data/atlases/GA24"))


def _ball(radius, shape=(48, 48, 48)):
    idx = np.indices(shape) - (np.array(shape)[:, None, None, None] - 1) / 2
    return (np.sqrt((idx ** 2).sum(0)) <= radius).astype(np.int16)


def test_identical_maps_score_dice_one_and_zero_distances():
    labels = _ball(10) + _ball(5)  # 2 inside, 1 around it
    scores = score_segmentation(labels, labels, (1.0, 1.0, 1.0), {1: "shell", 2: "core"}).set_index("structure")
    assert np.allclose(scores["dice"], 1.0) and np.allclose(scores[["hd95_mm", "assd_mm"]], 0.0)


def test_concentric_balls_give_the_radius_gap_as_surface_distance():
    # Balls of radius 10 and 12 voxels at 0.5 mm: every contour point lies 1 mm (2 voxels) from the other contour.
    scores = score_segmentation(_ball(10), _ball(12), (0.5, 0.5, 0.5), {1: "ball"}).set_index("structure")
    assert scores.loc["ball", "hd95_mm"] == pytest.approx(1.0, abs=0.3)
    assert scores.loc["ball", "assd_mm"] == pytest.approx(1.0, abs=0.3)
    expected = 2 * _ball(10).sum() / (_ball(10).sum() + _ball(12).sum())
    assert scores.loc["ball", "dice"] == pytest.approx(expected)


def test_a_structure_missing_from_the_prediction_scores_zero_dice_and_no_distance():
    truth = _ball(10) + _ball(5)
    pred = _ball(10)  # label 2 missing
    scores = score_segmentation(pred, truth, (1.0,) * 3, {1: "shell", 2: "core"}).set_index("structure")
    assert scores.loc["core", "dice"] == 0.0 and np.isnan(scores.loc["core", "hd95_mm"])
    assert scores.loc["mean", "dice"] == pytest.approx(scores.loc["shell", "dice"] / 2)
    assert scores.loc["mean", "hd95_mm"] == pytest.approx(scores.loc["shell", "hd95_mm"])  # NaN skipped


def test_labels_are_resampled_through_world_coordinates():
    labels = _ball(10)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    shifted = affine.copy()
    shifted[0, 3] = 3.0  # the same voxels, 3 mm further along x
    out = resample_labels(labels, shifted, labels.shape, affine)
    assert np.array_equal(out[3:], labels[:-3]) and out[:3].sum() == 0


def test_map_labels_renumbers_simultaneously():
    assert map_labels(np.array([1, 2, 8]), {8: 1, 1: 2, 2: 3}).tolist() == [2, 3, 1]


def test_settings_skip_the_subjects_own_atlas_and_reject_bad_values(tmp_path):
    s = SegmentationSettings(atlases=ATLASES)
    assert [p.name for p in s.atlases_for("GA22")] == ["GA24"]
    assert [p.name for p in s.atlases_for(None)] == ["GA22", "GA24"]
    with pytest.raises(GsvrError, match="no atlas left"):
        SegmentationSettings(atlases=ATLASES[:1]).atlases_for("GA22")
    (tmp_path / "GA99").mkdir()
    with pytest.raises(GsvrError, match="GA99: atlas folder has no srr.nii.gz"):
        SegmentationSettings(atlases=(str(tmp_path / "GA99"),)).atlases_for("x")
    with pytest.raises(GsvrError, match="unknown setting"):
        SegmentationSettings.from_dict({"atlas": []})
    with pytest.raises(GsvrError, match="needs nnunet_model"):
        SegmentationSettings(segmenter="nnunet")
    assert SegmentationSettings.from_dict({"merge_labels": {"8": "1"}}).merge_labels == {8: 1}


def test_nnunet_command_line_and_missing_program(tmp_path, monkeypatch):
    s = SegmentationSettings(segmenter="nnunet", nnunet_model="/models/feta", nnunet_folds=(0, 1))
    assert nnunet_command(s, Path("in"), Path("out")) == [
        "nnUNetv2_predict_from_modelfolder", "-i", "in", "-o", "out", "-m", "/models/feta", "-f", "0", "1"]
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GsvrError, match="nnUNetv2_predict_from_modelfolder not found"):
        segment_file(ROOT / "data/demo/GA23/srr.nii.gz", tmp_path / "labels.nii.gz", s)
    assert not (tmp_path / "labels.nii.gz").exists()


@pytest.mark.slow
def test_multi_atlas_segmentation_of_the_ground_truth_is_good_and_tells_a_blurred_volume_apart(tmp_path, demo_paths,
                                                                                                monkeypatch):
    """Issue 4's bar: the ground truth itself scores mean Dice >= 0.85 (default settings, atlases GA22 and
    GA24); the same volume blurred (Gaussian) scores clearly lower (sigma 1.5 voxels = 1.2 mm). antspyx's
    scratch files (transforms, fusion probability maps) do not outlive the call."""
    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    settings = SegmentationSettings(atlases=ATLASES)
    img = nib.load(demo_paths["volume"])
    blurred = tmp_path / "blurred.nii.gz"
    nib.save(nib.Nifti1Image(ndimage.gaussian_filter(img.get_fdata().astype(np.float32), 1.5), img.affine), blurred)
    means = {}
    for name, volume in (("truth", demo_paths["volume"]), ("blurred", blurred)):
        out = tmp_path / f"{name}_labels.nii.gz"
        segment_file(volume, out, settings, subject="GA23")
        scores = evaluate_segmentation_files(out, demo_paths["labels"], merge_labels=settings.merge_labels)
        assert list(scores["structure"]) == list(STRUCTURES.values()) + ["mean"]
        means[name] = scores.set_index("structure").loc["mean"]
    assert list(system_tmp.iterdir()) == []
    assert means["truth"]["dice"] >= 0.85
    assert means["blurred"]["dice"] < means["truth"]["dice"] - 0.03
    assert means["blurred"]["assd_mm"] > means["truth"]["assd_mm"]
