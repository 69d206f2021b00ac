"""External tool adapters: the command lines they build (the tools themselves are not run here)."""

import stat

import pytest

from gsvr.baselines.external import ExternalSettings, availability, build_command, run_external
from gsvr.errors import GsvrError

STACKS = ["/d/ax.nii.gz", "/d/cor.nii.gz"]
MASKS = ["/d/ax_m.nii.gz", "/d/cor_m.nii.gz"]


def test_nesvor_gets_the_same_inputs_with_its_own_flag_names():
    s = ExternalSettings.from_dict({"engine": "nesvor", "output": {"resolution_mm": 0.5}, "align": None})
    assert build_command(s, STACKS, MASKS, [3.0, 2.5], "/o/v.nii.gz") == [
        "nesvor", "reconstruct", "--input-stacks", *STACKS, "--stack-masks", *MASKS, "--output-volume", "/o/v.nii.gz",
        "--output-resolution", "0.5", "--registration", "none", "--thicknesses", "3", "2.5"]


def test_svrtk_takes_the_stack_count_one_mask_and_a_container_prefix():
    s = ExternalSettings.from_dict({"engine": "svrtk", "command": ["docker", "run", "--rm", "fetalsvrtk/svrtk", "mirtk"],
                                    "options": ["-iterations", 3]})
    assert build_command(s, STACKS, MASKS, [3.0, 3.0], "/o/v.nii.gz") == [
        "docker", "run", "--rm", "fetalsvrtk/svrtk", "mirtk", "reconstruct", "/o/v.nii.gz", "2", *STACKS,
        "-mask", MASKS[0], "-resolution", "0.8", "-thickness", "3", "3", "-iterations", "3"]


def test_niftymic_gets_stacks_masks_output_and_resolution():
    s = ExternalSettings.from_dict({"engine": "niftymic"})
    assert build_command(s, STACKS, MASKS, None, "/o/v.nii.gz") == [
        "niftymic_reconstruct_volume", "--filenames", *STACKS, "--filenames-masks", *MASKS, "--output", "/o/v.nii.gz",
        "--isotropic-resolution", "0.8"]


def test_unknown_keys_and_downloaded_weights_are_refused():
    with pytest.raises(GsvrError, match="unknown keys"):
        ExternalSettings.from_dict({"engine": "nesvor", "iterations": 3})
    with pytest.raises(GsvrError, match="svort"):
        ExternalSettings.from_dict({"engine": "nesvor", "align": {"method": "svort"}})


def test_a_missing_tool_is_reported_not_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    s = ExternalSettings.from_dict({"engine": "niftymic"})
    assert availability(s) == "not installed (niftymic_reconstruct_volume not found on PATH)"
    with pytest.raises(GsvrError, match="not installed"):
        run_external(s, STACKS, MASKS, None, str(tmp_path / "v.nii.gz"))


def test_an_installed_tool_is_run_and_its_volume_converted(tmp_path, monkeypatch):
    """A stand-in `nesvor` on PATH copies the first stack to --output-volume, as a tool would write its result."""
    import nibabel as nib
    import numpy as np

    fake = tmp_path / "bin" / "nesvor"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nwhile [ "$1" != "--input-stacks" ]; do shift; done; src=$2\n'
                    'while [ "$1" != "--output-volume" ]; do shift; done; cp "$src" "$2"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    affine = np.diag([0.8, 0.8, 0.8, 1.0])
    nib.save(nib.Nifti1Image(np.arange(27, dtype=np.int16).reshape(3, 3, 3), affine), tmp_path / "s.nii.gz")
    out = tmp_path / "out.nii.gz"
    seconds = run_external(ExternalSettings.from_dict({"engine": "nesvor"}), [str(tmp_path / "s.nii.gz")],
                           [str(tmp_path / "s.nii.gz")], None, str(out))
    img = nib.load(out)
    assert seconds >= 0 and img.get_data_dtype() == np.float32 and np.allclose(img.affine, affine)
    assert np.array_equal(img.get_fdata(), np.arange(27).reshape(3, 3, 3))
    assert not list(tmp_path.glob("gsvr-nesvor-*"))  # the scratch folder is gone
