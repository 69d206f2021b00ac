"""Leave-one-stack-out assessment (data without ground truth)."""

import numpy as np
import pytest
from helpers import stacks_from_simulation
from scipy import ndimage

from gsvr.cli import main
from gsvr.errors import GsvrError
from gsvr.evaluate.assess import assess_stacks, compare_pixels, simulate_stack, slice_registered_fit
from gsvr.recon.config import ReconConfig
from gsvr.simulate.stacks import SimulationConfig, simulate_stacks

SIM = dict(inplane_spacing_mm=1.6, thickness_mm=4.0, noise_level=0.01, fov_margin_mm=4.0, through_plane_samples=11)
# Headers are right in these simulations: no stack multi-start (the default), which assess repeats per fold.
FAST = {"init": {"n_gaussians": 6000}, "model": {"k_neighbors": 16}, "output": {"resolution_mm": 1.6},
        "svr": {"spacings_mm": [3.2, 3.2, 2.4, 2.4, 2.4]}, "align": None}


def _stacks(small_subject, motion_deg, seed=4):
    vol, mask, affine = small_subject
    sim = simulate_stacks(vol, mask, affine, SimulationConfig(obliquity_deg=5.0, motion_rotation_deg=motion_deg,
                                                              motion_translation_mm=0.75 * motion_deg, seed=seed, **SIM))
    return stacks_from_simulation(sim)


def test_the_ground_truth_simulated_through_the_psf_matches_motion_free_slices(small_subject):
    vol, _, affine = small_subject
    for stack in _stacks(small_subject, 0.0):
        ncc, psnr = compare_pixels(simulate_stack(vol, affine, stack), stack.data[stack.mask].astype(float))
        assert ncc > 0.98 and psnr > 33, (stack.name, ncc, psnr)


def test_the_transform_carries_the_volume_onto_the_stack(small_subject):
    vol, _, affine = small_subject
    stack = _stacks(small_subject, 0.0)[0]
    moved = affine.copy()
    moved[:3, 3] += [4.0, -3.0, 2.0]  # the volume's anatomy sits 5.4 mm away from the stack's
    back = np.eye(4)
    back[:3, 3] = [-4.0, 3.0, -2.0]
    acquired = stack.data[stack.mask].astype(float)
    ncc_aligned, _ = compare_pixels(simulate_stack(vol, moved, stack, back), acquired)
    ncc_off, _ = compare_pixels(simulate_stack(vol, moved, stack), acquired)
    assert ncc_aligned > 0.98 > ncc_off + 0.1


def test_slice_registration_sees_a_blurred_volume_as_worse_despite_slice_motion(small_subject):
    vol, _, affine = small_subject
    stack = _stacks(small_subject, 4.0)[1]
    cfg = ReconConfig.from_dict(FAST)
    sharp = slice_registered_fit(vol, affine, stack, np.eye(4), cfg)
    blurred = slice_registered_fit(ndimage.gaussian_filter(vol, 2.0), affine, stack, np.eye(4), cfg)
    raw, _ = compare_pixels(simulate_stack(vol, affine, stack), stack.data[stack.mask].astype(float))
    assert sharp[0] > 0.95 > raw, (sharp, raw)  # the slice motion is taken out
    assert sharp[0] > blurred[0] + 0.02 and sharp[1] > blurred[1] + 1.0, (sharp, blurred)


@pytest.mark.slow
def test_leave_one_stack_out_table_has_a_row_per_stack_and_the_mean(small_subject):
    stacks = _stacks(small_subject, 4.0)
    table = assess_stacks(stacks, ReconConfig.from_dict(FAST), method="svr_classic", progress=False)
    assert list(table["stack"]) == ["s0", "s1", "s2", "mean"]
    assert np.isfinite(table.drop(columns="stack").to_numpy(float)).all()
    # Slice registration removes the left-out stack's own motion, so it explains it better.
    assert (table["ncc_slices"] > table["ncc"]).all()
    assert table["ncc_slices"].iloc[-1] > 0.9
    assert table["registration_rotation_deg"].max() < 5.0


def test_assessment_needs_two_stacks(small_subject, tmp_path, capsys):
    with pytest.raises(GsvrError, match="at least 2 stacks"):
        assess_stacks(_stacks(small_subject, 0.0)[:1], ReconConfig.from_dict(FAST))
    import nibabel as nib

    s = _stacks(small_subject, 0.0)[0]
    nib.save(nib.Nifti1Image(s.data, s.affine), tmp_path / "one.nii.gz")
    code = main(["assess", "--input-stacks", str(tmp_path / "one.nii.gz"), "--output-tsv", str(tmp_path / "a.tsv"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "one.nii.gz" in err[0] and "at least 2 stacks" in err[0]
    assert not (tmp_path / "a.tsv").exists()
