"""The gsvr command: one-line errors, no traceback, nothing half-written."""

import nibabel as nib
import numpy as np
import pytest

from gsvr.cli import main


def _stack(path, shape=(12, 12, 6)):
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(shape).astype(np.float32) + 1, np.diag([1.0, 1.0, 3.0, 1.0])), path)


def test_bad_input_exits_nonzero_with_one_line_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not an image")
    out = tmp_path / "out.nii.gz"
    code = main(["reconstruct", "--input-stacks", str(bad), "--output-volume", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and str(bad) in err[0] and "Traceback" not in err[0]
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_unwritable_output_folder_is_reported_before_any_work(tmp_path, capsys):
    _stack(tmp_path / "s.nii.gz")
    code = main(["reconstruct", "--input-stacks", str(tmp_path / "s.nii.gz"), "--output-volume", str(tmp_path / "missing" / "o.nii.gz")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_mismatched_counts_are_reported(tmp_path, capsys):
    _stack(tmp_path / "s.nii.gz")
    code = main(["reconstruct", "--input-stacks", str(tmp_path / "s.nii.gz"), str(tmp_path / "s.nii.gz"),
                 "--thicknesses", "3", "--output-volume", str(tmp_path / "o.nii.gz")])
    assert code == 2
    assert "2 stacks but 1 thicknesses" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    from gsvr.errors import GsvrError

    with pytest.raises(GsvrError):
        main(["--debug", "reconstruct", "--input-stacks", str(tmp_path / "none.nii.gz"), "--output-volume", str(tmp_path / "o.nii.gz")])


def test_svr_command_takes_the_reconstruct_flags_and_reports_bad_input_the_same_way(tmp_path, capsys):
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not an image")
    out = tmp_path / "out.nii.gz"
    code = main(["svr", "--input-stacks", str(bad), "--output-volume", str(out), "--output-resolution", "1.0",
                 "--output-slices-tsv", str(tmp_path / "s.tsv"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(bad) in err[0]
    assert not out.exists()
    with pytest.raises(SystemExit):  # no Gaussian model to save
        main(["svr", "--input-stacks", str(bad), "--output-volume", str(out), "--output-model", str(tmp_path / "m.pt")])
