import nibabel as nib
import numpy as np
import pytest

from gsvr.errors import GsvrError
from gsvr.io import load_stack, load_stacks, save_volume
from gsvr.io.nifti import load_image


def _oblique_affine():
    from scipy.spatial.transform import Rotation

    rot = Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix()
    aff = np.eye(4)
    aff[:3, :3] = rot * np.array([0.8, 0.8, 3.3])
    aff[:3, 3] = [-40.5, 12.25, 7.0]
    return aff


def test_save_volume_keeps_the_affine_in_sform_and_qform(tmp_path):
    aff = _oblique_affine()
    path = tmp_path / "v.nii.gz"
    save_volume(path, np.random.rand(5, 6, 7).astype(np.float32), aff)
    img = nib.load(path)
    sform, scode = img.get_sform(coded=True)
    qform, qcode = img.get_qform(coded=True)
    assert scode == 1 and qcode == 1
    assert np.allclose(sform, aff, atol=1e-5)
    assert np.allclose(qform, aff, atol=1e-5)
    assert img.get_data_dtype() == np.float32
    data, read_aff = load_image(path)
    assert np.allclose(read_aff, aff, atol=1e-5)
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_qform_is_used_when_sform_is_unset(tmp_path):
    aff = _oblique_affine()
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), None)
    img.set_qform(aff, code=1)
    img.set_sform(np.eye(4), code=0)
    nib.save(img, tmp_path / "q.nii.gz")
    _, read = load_image(tmp_path / "q.nii.gz")
    assert np.allclose(read, aff, atol=1e-5)


def _write(path, data, aff):
    nib.save(nib.Nifti1Image(np.asarray(data), aff), path)


def test_thickness_defaults_to_third_axis_spacing(tmp_path):
    aff = _oblique_affine()
    _write(tmp_path / "s.nii.gz", np.ones((8, 8, 4), np.float32), aff)
    st = load_stack(tmp_path / "s.nii.gz")
    assert st.thickness_mm == pytest.approx(3.3)
    assert load_stack(tmp_path / "s.nii.gz", thickness_mm=3.0).thickness_mm == 3.0


def test_mask_within_tolerance_is_taken_as_is_and_larger_offset_is_resampled(tmp_path):
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    _write(tmp_path / "s.nii.gz", np.ones((10, 10, 5), np.float32), aff)
    mask = np.zeros((10, 10, 5), np.uint8)
    mask[2:6, 2:6, 1:3] = 1
    near = aff.copy()
    near[0, 3] += 5e-4
    _write(tmp_path / "m_near.nii.gz", mask, near)
    st = load_stack(tmp_path / "s.nii.gz", tmp_path / "m_near.nii.gz")
    assert np.array_equal(st.mask, mask > 0)
    shifted = aff.copy()
    shifted[0, 3] += 1.0  # one voxel: the mask content moves by one voxel on the stack grid
    _write(tmp_path / "m_far.nii.gz", mask, shifted)
    with pytest.warns(UserWarning, match="resampled nearest-neighbour"):
        st = load_stack(tmp_path / "s.nii.gz", tmp_path / "m_far.nii.gz")
    assert np.array_equal(st.mask, np.roll(mask, 1, axis=0) > 0)


@pytest.mark.parametrize(
    "case, match",
    [
        ("not_nifti", "cannot read stack as NIfTI"),
        ("truncated", "cannot read stack as NIfTI"),
        ("two_d", "must be a 3D image"),
        ("four_d", "must be a 3D image"),
        ("nan", "NaN/Inf"),
        ("single_slice", "at least 2 slices"),
        ("missing", "does not exist"),
    ],
)
def test_bad_stacks_raise_errors_naming_the_file(tmp_path, case, match):
    path = tmp_path / f"{case}.nii.gz"
    aff = np.eye(4)
    if case == "not_nifti":
        path.write_text("hello")
    elif case == "truncated":
        _write(path, np.random.rand(20, 20, 10).astype(np.float32), aff)
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif case == "two_d":
        _write(path, np.ones((5, 5), np.float32), aff)
    elif case == "four_d":
        _write(path, np.ones((5, 5, 5, 2), np.float32), aff)
    elif case == "nan":
        d = np.ones((5, 5, 5), np.float32)
        d[1, 1, 1] = np.nan
        _write(path, d, aff)
    elif case == "single_slice":
        _write(path, np.ones((5, 5, 1), np.float32), aff)
    with pytest.raises(GsvrError, match=match) as err:
        load_stack(path)
    assert str(path) in str(err.value)


def test_empty_mask_and_bad_thickness_and_count_mismatch(tmp_path):
    _write(tmp_path / "s.nii.gz", np.ones((5, 5, 5), np.float32), np.eye(4))
    _write(tmp_path / "m.nii.gz", np.zeros((5, 5, 5), np.uint8), np.eye(4))
    with pytest.raises(GsvrError, match="mask is empty"):
        load_stack(tmp_path / "s.nii.gz", tmp_path / "m.nii.gz")
    with pytest.raises(GsvrError, match="thickness must be > 0"):
        load_stack(tmp_path / "s.nii.gz", thickness_mm=0.0)
    with pytest.raises(GsvrError, match="2 stacks but 1 masks"):
        load_stacks([tmp_path / "s.nii.gz"] * 2, [tmp_path / "m.nii.gz"])
    with pytest.raises(GsvrError, match="1 stacks but 2 thicknesses"):
        load_stacks([tmp_path / "s.nii.gz"], None, [3.0, 3.0])


def test_mask_that_cannot_be_matched_is_an_error(tmp_path):
    _write(tmp_path / "s.nii.gz", np.ones((5, 5, 5), np.float32), np.eye(4))
    far = np.eye(4)
    far[:3, 3] = 500.0
    _write(tmp_path / "m.nii.gz", np.ones((5, 5, 5), np.uint8), far)
    with pytest.raises(GsvrError, match="does not overlap"):
        load_stack(tmp_path / "s.nii.gz", tmp_path / "m.nii.gz")


def test_a_stack_with_its_slices_along_the_first_axis_is_reoriented_onto_the_same_world_points(tmp_path):
    aff = _oblique_affine()
    swapped = aff.copy()
    swapped[:3, :3] = aff[:3, [2, 0, 1]]  # the 3.3 mm slice axis stored first
    rng = np.random.default_rng(0)
    data = rng.random((5, 8, 7)).astype(np.float32)  # [slices, i, j]
    mask = np.zeros((5, 8, 7), np.uint8)
    mask[1:4, 2:6, 2:5] = 1
    _write(tmp_path / "s.nii.gz", data, swapped)
    _write(tmp_path / "m.nii.gz", mask, swapped)
    with pytest.warns(UserWarning, match="voxel axis 0"):
        st = load_stack(tmp_path / "s.nii.gz", tmp_path / "m.nii.gz")
    assert st.data.shape == (8, 7, 5) and st.thickness_mm == pytest.approx(3.3)
    np.testing.assert_allclose(np.linalg.norm(st.affine[:3, :3], axis=0), [0.8, 0.8, 3.3], atol=1e-5)
    # Every voxel keeps its intensity and its world position.
    i, j, k = 3, 4, 2
    np.testing.assert_allclose(st.affine @ [i, j, k, 1], swapped @ [k, i, j, 1], atol=1e-4)
    assert st.data[i, j, k] == data[k, i, j] and st.mask[i, j, k] == bool(mask[k, i, j])
    assert st.mask.sum() == mask.sum()


def test_a_probabilistic_mask_is_binarised_at_one_half_with_a_warning(tmp_path):
    aff = _oblique_affine()
    _write(tmp_path / "s.nii.gz", np.ones((8, 8, 4), np.float32), aff)
    prob = np.zeros((8, 8, 4), np.float32)
    prob[2:6, 2:6, :] = 0.8
    prob[0:2, :, :] = 0.1  # a faint tail that > 0 would have kept
    _write(tmp_path / "m.nii.gz", prob, aff)
    with pytest.warns(UserWarning, match="not binary.*binarised at 0.5"):
        st = load_stack(tmp_path / "s.nii.gz", tmp_path / "m.nii.gz")
    assert st.mask.sum() == 4 * 4 * 4


def test_an_image_without_orientation_is_loaded_with_a_warning(tmp_path):
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.diag([2.0, 2.0, 3.0, 1.0]))
    img.set_sform(None, code=0)
    img.set_qform(None, code=0)
    nib.save(img, tmp_path / "n.nii.gz")
    with pytest.warns(UserWarning, match="no orientation"):
        load_image(tmp_path / "n.nii.gz")


def test_a_folder_given_as_an_image_is_named_as_a_folder(tmp_path):
    with pytest.raises(GsvrError, match="is a folder, not a NIfTI file"):
        load_image(tmp_path, what="stack")


def test_a_temporary_left_by_a_process_killed_with_sigkill_is_removed_by_the_next_write(tmp_path):
    import signal
    import subprocess
    import sys

    out = tmp_path / "v.nii.gz"
    writer = ("import sys, time\nfrom gsvr.io.nifti import atomic_output\n"
              "with atomic_output(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'half')\n    print('writing', flush=True)\n"
              "    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", writer, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    alive = subprocess.Popen([sys.executable, "-c", writer, str(out)], stdout=subprocess.PIPE, text=True)
    assert alive.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    try:
        assert len(list(tmp_path.glob(".*tmp*"))) == 2  # what SIGKILL leaves (no clean-up can run), and a live writer's
        save_volume(out, np.zeros((3, 3, 3), np.float32), np.eye(4))
        left = list(tmp_path.glob(".*tmp*"))
        assert len(left) == 1 and f".{alive.pid}." in left[0].name  # the dead one is swept, the running one kept
    finally:
        alive.kill()
        alive.wait()
