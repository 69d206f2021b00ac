"""Bad input to the subcommands other than reconstruct: exit status 2, one stderr line naming the file and the
problem, no traceback, nothing written (no output, no hidden temporary, no folder) and no input changed."""

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from gsvr.cli import main

ROOT = Path(__file__).resolve().parents[1]
ATLAS = str(ROOT / "data/atlases/GA22")
STACK_AFFINE = np.diag([1.0, 1.0, 3.0, 1.0])


def _save(path, data, affine=STACK_AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64)), path)
    return str(path)


@pytest.fixture
def files(tmp_path):
    """Small inputs: two 12x12x6 stacks with masks, a 24^3 volume with its mask, and a folder."""
    rng = np.random.default_rng(0)
    mask = np.zeros((12, 12, 6), np.uint8)
    mask[3:9, 3:9, 1:5] = 1
    vol = np.zeros((24, 24, 24), np.float32)
    vol[6:18, 6:18, 6:18] = 1 + rng.random((12, 12, 12))
    (tmp_path / "folder").mkdir()
    return {"s1": _save(tmp_path / "s1.nii.gz", rng.random((12, 12, 6)).astype(np.float32) + 1),
            "s2": _save(tmp_path / "s2.nii.gz", rng.random((12, 12, 6)).astype(np.float32) + 1),
            "m1": _save(tmp_path / "m1.nii.gz", mask), "m2": _save(tmp_path / "m2.nii.gz", mask),
            "vol": _save(tmp_path / "vol.nii.gz", vol, np.eye(4)),
            "volmask": _save(tmp_path / "volmask.nii.gz", (vol > 0).astype(np.uint8), np.eye(4)),
            "folder": str(tmp_path / "folder"), "tmp": tmp_path}


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else "folder" for p in sorted(root.rglob("*"))}


def _fails_cleanly(args, files, capsys, *named) -> str:
    """Run ``gsvr args``: it must exit 2 with one stderr line holding every string of ``named``, and leave the
    temporary folder (inputs and all) exactly as it was. Returns the line."""
    before = _snapshot(files["tmp"])
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("gsvr: error: ") and "Traceback" not in err[0], err
    for text in named:
        assert str(text) in err[0], err
    assert _snapshot(files["tmp"]) == before, "an output was left behind or an input changed"
    return err[0]


# preprocess


def test_preprocess_output_dir_that_is_a_file_is_refused(files, capsys):
    _fails_cleanly(["preprocess", "--input-stacks", files["s1"], "--stack-masks", files["m1"], "--output-dir", files["s2"]],
                   files, capsys, files["s2"], "is a file, not a folder")


def test_preprocess_failure_leaves_no_output_folder(files, capsys):
    missing = files["tmp"] / "missing.nii.gz"
    _fails_cleanly(["preprocess", "--input-stacks", missing, "--stack-masks", files["m1"],
                    "--output-dir", files["tmp"] / "new" / "out"], files, capsys, missing, "does not exist")


def test_preprocess_intensity_failure_is_the_only_line(files, capsys, caplog):
    """The dark stack fails standardisation, after both stacks are cropped: no "cropped" progress lines before
    the error (the command's log lines go to stderr; under pytest they are caught by caplog)."""
    _save(files["s2"], -np.ones((12, 12, 6), np.float32))
    caplog.set_level(logging.INFO)
    _fails_cleanly(["preprocess", "--input-stacks", files["s1"], files["s2"], "--stack-masks", files["m1"], files["m2"],
                    "--output-dir", files["tmp"] / "out"], files, capsys, files["s2"], "quantile is not positive")
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO], caplog.text


def _disk_full_on_second_mask(monkeypatch, module):
    """``module.save_mask`` (as gsvr.io.nifti exports it) raises ENOSPC from its second call on."""
    import errno

    from gsvr.io import nifti

    calls = []

    def save_mask(path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return nifti.save_mask(path, *args, **kwargs)

    monkeypatch.setattr(module, "save_mask", save_mask)


def test_preprocess_disk_full_on_a_later_output_leaves_no_output(files, capsys, monkeypatch):
    from gsvr.io import nifti

    _disk_full_on_second_mask(monkeypatch, nifti)
    _fails_cleanly(["preprocess", "--input-stacks", files["s1"], files["s2"], "--stack-masks", files["m1"], files["m2"],
                    "--output-dir", files["tmp"] / "out"], files, capsys, "No space left on device")


@pytest.mark.parametrize("stack, mask", [("s1", "m1"), ("m1", "m1")])
def test_preprocess_into_the_input_folder_never_overwrites_an_input(files, capsys, stack, mask):
    """Outputs are <stack name>.nii.gz and <stack name>_mask.nii.gz: written beside the inputs, a stack or mask
    of that name would be replaced by its own preprocessed copy."""
    _fails_cleanly(["preprocess", "--input-stacks", files[stack], "--stack-masks", files[mask], "--output-dir", files["tmp"]],
                   files, capsys, files[stack], "would overwrite the input")


def test_an_empty_mask_on_another_grid_is_one_error_line_without_the_resampling_warning(files, capsys):
    empty = _save(files["tmp"] / "empty.nii.gz", np.zeros((10, 10, 5), np.uint8))
    _fails_cleanly(["preprocess", "--input-stacks", files["s1"], "--stack-masks", empty, "--output-dir", files["tmp"] / "out"],
                   files, capsys, empty, "mask is empty")


# segment


@pytest.mark.parametrize("output, extra, named", [
    ("labels.mgz", [], ["labels.mgz", "must be a NIfTI file name"]),
    ("{vol}", [], ["{vol}", "names an input file"]),
    ("labels.nii.gz", ["--threads", "-2"], ["--threads must be >= 1"]),
    ("labels.nii.gz", ["--registration-spacing", "nan"], ["registration_spacing_mm must be a finite number > 0"]),
])
def test_segment_refuses_bad_outputs_and_flags_before_any_work(files, capsys, output, extra, named):
    output = output.format(vol=files["vol"]) if "{" in output else files["tmp"] / output
    _fails_cleanly(["segment", "--input-volume", files["vol"], "--output-labels", output, "--atlas", ATLAS, *extra],
                   files, capsys, *[n.format(vol=files["vol"]) for n in named])


def test_segment_registration_failure_is_one_line_naming_the_volume(files, capsys):
    """A 12x12x6 stack at a 4 mm registration spacing is too small to register: ITK's several-line error
    becomes one line."""
    _fails_cleanly(["segment", "--input-volume", files["s1"], "--output-labels", files["tmp"] / "labels.nii.gz",
                    "--atlas", ATLAS, "--registration-spacing", "4"], files, capsys, files["s1"], "segmentation failed")


def test_segment_with_a_single_atlas_writes_its_labels(files, capsys):
    """Joint label fusion needs two atlases: one atlas's carried labels are the segmentation (was an IndexError)."""
    out = files["tmp"] / "labels.nii.gz"
    code = main(["segment", "--input-volume", files["vol"], "--output-labels", str(out), "--atlas", ATLAS,
                 "--registration-spacing", "3"])
    assert code == 0, capsys.readouterr().err
    assert nib.load(out).shape == (24, 24, 24)


# evaluate


@pytest.mark.parametrize("target", ["vol", "volmask"])
def test_evaluate_output_json_that_names_an_input_is_refused(files, capsys, target):
    _fails_cleanly(["evaluate", "--input-volume", files["vol"], "--reference", files["vol"], "--reference-mask", files["volmask"],
                    "--output-json", files[target], "--no-registration"], files, capsys, files[target], "names an input file")


# sample-volume


def test_sample_volume_model_that_is_a_folder_is_called_a_folder(files, capsys):
    _fails_cleanly(["sample-volume", "--input-model", files["folder"], "--output-volume", files["tmp"] / "v.nii.gz"],
                   files, capsys, files["folder"], "is a folder")


# simulate


def _simulate(files, volume, mask, out, *extra):
    return ["simulate", "--input-volume", volume, "--input-mask", mask, "--output-dir", out, "--n-stacks", "1",
            "--inplane-spacing", "2", "--thickness", "4", *extra]


def test_simulate_mask_on_another_grid_is_refused(files, capsys):
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    mask = _save(files["tmp"] / "shifted_mask.nii.gz", nib.load(files["volmask"]).get_fdata().astype(np.uint8), shifted)
    _fails_cleanly(_simulate(files, files["vol"], mask, files["tmp"] / "sim"), files, capsys, mask, "differs from the volume's")


def test_simulate_empty_mask_is_named(files, capsys):
    empty = _save(files["tmp"] / "empty.nii.gz", np.zeros((24, 24, 24), np.uint8), np.eye(4))
    _fails_cleanly(_simulate(files, files["vol"], empty, files["tmp"] / "sim"), files, capsys, empty, "mask is empty")


def test_simulate_never_overwrites_its_input(files, capsys):
    (files["tmp"] / "sim").mkdir()
    volume = files["tmp"] / "sim" / "stack0.nii.gz"
    volume.write_bytes(Path(files["vol"]).read_bytes())
    _fails_cleanly(_simulate(files, volume, files["volmask"], files["tmp"] / "sim"), files, capsys, volume,
                   "would overwrite the input")


def test_simulate_disk_full_on_a_later_output_leaves_no_output(files, capsys, monkeypatch):
    from gsvr.io import nifti

    _disk_full_on_second_mask(monkeypatch, nifti)  # and the output folder did not exist: none is left
    _fails_cleanly([*_simulate(files, files["vol"], files["volmask"], files["tmp"] / "sim")[:-6], "--n-stacks", "2",
                    "--inplane-spacing", "2", "--thickness", "4"], files, capsys, "No space left on device")


def test_simulate_refuses_what_would_not_fit_in_memory(files, capsys, monkeypatch):
    """Under the per-stack voxel cap, but one slice's PSF samples at 0.05 mm take gigabytes: refused before any work
    on a machine (here: said to have) 1 GB."""
    from gsvr.simulate import stacks

    monkeypatch.setattr(stacks, "physical_memory_bytes", lambda: 10**9)
    _fails_cleanly(_simulate(files, files["vol"], files["volmask"], files["tmp"] / "sim", "--inplane-spacing", "0.05"),
                   files, capsys, "too large for this machine", "GB of memory")


def test_simulate_refuses_stacks_too_large_to_allocate(files, capsys):
    _fails_cleanly(_simulate(files, files["vol"], files["volmask"], files["tmp"] / "sim", "--inplane-spacing", "1e-4"),
                   files, capsys, "inplane_spacing_mm", "too large")


# config --migrate


@pytest.mark.parametrize("content, problem", [
    ("n_gaussians: [1, 2\n", "not valid YAML (line 2"),
    (b"\xff\xfe\x00binary", "not a text file"),
    ("n_gaussians: 200\nbogus_key: 3\n", "unknown flat setting(s) bogus_key"),
    ("n_gaussians: -5\n", "init.n_gaussians must be > 0"),
])
def test_config_migrate_names_the_file_and_the_problem_in_one_line(files, capsys, content, problem):
    path = files["tmp"] / "old.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    _fails_cleanly(["config", "--migrate", path], files, capsys, path, problem)


# assess (input errors)


def test_assess_output_tsv_that_names_an_input_is_refused_before_any_work(files, capsys):
    _fails_cleanly(["assess", "--input-stacks", files["s1"], files["s2"], "--output-tsv", files["s2"], "--no-progress"],
                   files, capsys, files["s2"], "--output-tsv names an input file")
