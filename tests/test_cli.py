"""The gsvr command: one-line errors, no traceback, nothing half-written."""

import nibabel as nib
import numpy as np
import pytest

from gsvr.cli import main


def _stack(path, shape=(12, 12, 6)):
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(shape).astype(np.float32) + 1, np.diag([1.0, 1.0, 3.0, 1.0])), path)


def _small_run(tmp_path, *, svr_cycles: int, fit_steps: int) -> list[str]:
    """Two tiny stacks and a config that reconstructs them in seconds: the reconstruct arguments for them."""
    stacks = [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]
    for s in stacks:
        _stack(s)
    (tmp_path / "cfg.yaml").write_text(f"init: {{n_gaussians: 200}}\nsvr: {{spacings_mm: {[3.0] * svr_cycles}, stack_spacings_mm: []}}\n"
                                       f"fit: {{steps: {fit_steps}}}\nalign: null\noutput: {{resolution_mm: 2.0}}\n")
    return ["reconstruct", "--input-stacks", *map(str, stacks), "--config", str(tmp_path / "cfg.yaml"), "--no-progress"]


def test_bad_input_exits_nonzero_with_one_line_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not an image")
    out = tmp_path / "out.nii.gz"
    code = main(["reconstruct", "--input-stacks", str(bad), "--output-volume", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and str(bad) in err[0] and "Traceback" not in err[0]
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_stack_without_positive_intensities_is_named_with_its_folder(tmp_path, capsys):
    """Two clinic folders hold files of the same name: the error must say which one is dark."""
    stacks = []
    for day in ("day1", "day2"):
        (tmp_path / day).mkdir()
        stacks.append(tmp_path / day / "ax.nii.gz")
        _stack(stacks[-1])
    nib.save(nib.Nifti1Image(-np.ones((12, 12, 6), np.float32), np.diag([1.0, 1.0, 3.0, 1.0])), stacks[1])
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((12, 12, 6), np.uint8), np.diag([1.0, 1.0, 3.0, 1.0])), mask)
    (tmp_path / "cfg.yaml").write_text("align: null\n")
    code = main(["reconstruct", "--input-stacks", *map(str, stacks), "--stack-masks", str(mask), str(mask),
                 "--config", str(tmp_path / "cfg.yaml"),
                 "--output-volume", str(tmp_path / "o.nii.gz"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(stacks[1]) in err[0] and str(stacks[0]) not in err[0], err
    assert not (tmp_path / "o.nii.gz").exists()


def test_unwritable_output_folder_is_reported_before_any_work(tmp_path, capsys):
    _stack(tmp_path / "s.nii.gz")
    code = main(["reconstruct", "--input-stacks", str(tmp_path / "s.nii.gz"), "--output-volume", str(tmp_path / "missing" / "o.nii.gz")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--checkpoint", "{stack}"], "--checkpoint names an input file"),
    (["--output-log", "{out}"], "given to both --output-volume and --output-log"),
    (["--checkpoint", "{other}"], "add --resume"),
])
def test_outputs_that_would_destroy_a_file_are_refused_before_any_work(tmp_path, capsys, extra, message):
    stack, other, out = tmp_path / "s.nii.gz", tmp_path / "notes.txt", tmp_path / "o.nii.gz"
    _stack(stack)
    other.write_text("keep me")
    before = stack.read_bytes()
    extra = [e.format(stack=stack, out=out, other=other) for e in extra]
    code = main(["reconstruct", "--input-stacks", str(stack), "--output-volume", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert stack.read_bytes() == before and other.read_text() == "keep me" and not out.exists()


@pytest.mark.parametrize("name, message", [("o.mgz", "must be a NIfTI file name"), ("", "is a folder")])
def test_an_output_volume_that_is_not_a_nifti_file_name_is_refused_before_any_work(tmp_path, capsys, name, message):
    _stack(tmp_path / "s.nii.gz")
    code = main(["reconstruct", "--input-stacks", str(tmp_path / "s.nii.gz"), "--output-volume", str(tmp_path / name),
                 "--no-progress"])
    assert code == 2 and message in capsys.readouterr().err


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


def test_preprocess_writes_cropped_stacks_and_masks_in_the_same_world_place(tmp_path, capsys):
    shape = (40, 36, 6)
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    affine[:3, 3] = (-10.0, 4.0, 2.0)
    data = np.random.default_rng(1).random(shape).astype(np.float32) + 1
    mask = np.zeros(shape, np.uint8)
    mask[10:20, 12:22, 1:5] = 1
    for name, scale in (("a", 1.0), ("b", 2.0)):
        nib.save(nib.Nifti1Image(data * scale, affine), tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(mask, affine), tmp_path / f"{name}_m.nii.gz")
    out = tmp_path / "pre"
    code = main(["preprocess", "--input-stacks", str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"),
                 "--stack-masks", str(tmp_path / "a_m.nii.gz"), str(tmp_path / "b_m.nii.gz"),
                 "--output-dir", str(out), "--crop-margin", "1.6"])
    assert code == 0, capsys.readouterr().err
    a, am, b = (nib.load(out / f) for f in ("a.nii.gz", "a_mask.nii.gz", "b.nii.gz"))
    assert a.shape == (14, 14, 4) and am.shape == a.shape
    assert np.allclose(a.affine @ [0, 0, 0, 1], affine @ [8, 10, 1, 1])
    inside = np.asarray(am.dataobj) > 0
    qa, qb = (np.quantile(np.asarray(img.dataobj)[inside], 0.99) for img in (a, b))
    assert np.isclose(qa, qb, rtol=1e-5)  # standardised to a common level
    # A missing mask file: one line naming it, nothing written.
    code = main(["preprocess", "--input-stacks", str(tmp_path / "a.nii.gz"), "--stack-masks", str(tmp_path / "nope.nii.gz"),
                 "--output-dir", str(tmp_path / "pre2")])
    assert code == 2 and "nope.nii.gz" in capsys.readouterr().err
    assert not list((tmp_path / "pre2").glob("*"))


def test_a_stack_that_overlaps_no_other_is_named(tmp_path, capsys):
    shape = (16, 16, 6)
    data = np.random.default_rng(2).random(shape).astype(np.float32) + 1
    mask = np.zeros(shape, np.uint8)
    mask[4:12, 4:12, 1:5] = 1
    for name, shift in (("a", 0.0), ("b", 0.0), ("far", 400.0)):
        affine = np.diag([1.0, 1.0, 3.0, 1.0])
        affine[0, 3] = shift
        nib.save(nib.Nifti1Image(data, affine), tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(mask, affine), tmp_path / f"{name}_m.nii.gz")
    out = tmp_path / "o.nii.gz"
    code = main(["reconstruct", "--input-stacks", *(str(tmp_path / f"{n}.nii.gz") for n in ("a", "b", "far")),
                 "--stack-masks", *(str(tmp_path / f"{n}_m.nii.gz") for n in ("a", "b", "far")),
                 "--output-volume", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "far.nii.gz" in err[0] and "does not overlap" in err[0]
    assert not out.exists()


def test_sigterm_leaves_the_checkpoint_and_no_output_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    """What a cluster scheduler sends before it kills a job: the run unwinds like Ctrl-C."""
    import os
    import signal

    from gsvr.recon import checkpoint as ckmod

    out, ck = tmp_path / "o.nii.gz", tmp_path / "run.ckpt"
    args = [*_small_run(tmp_path, svr_cycles=2, fit_steps=4), "--output-volume", str(out), "--checkpoint", str(ck)]
    save = ckmod.Checkpointer.save

    def save_then_sigterm(self, *a, **k):
        save(self, *a, **k)
        os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(ckmod.Checkpointer, "save", save_then_sigterm)
        assert main(args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "terminated (SIGTERM)" in err and f"--resume --checkpoint {ck}" in err
    assert ck.exists() and not out.exists() and not list(tmp_path.glob(".*tmp*"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler does not outlive the command
    assert main([*args, "--resume"]) == 0 and out.exists() and not ck.exists()


def _volume(path, affine, value=1.0):
    data = np.zeros((16, 16, 16), np.float32)
    data[4:12, 4:12, 4:12] = value + np.random.default_rng(1).random((8, 8, 8))
    nib.save(nib.Nifti1Image(data, affine), path)


@pytest.mark.parametrize("case, message", [
    ("far", "does not overlap"), ("shifted_mask", "mask grid does not overlap"), ("zero", "zero everywhere")])
def test_evaluate_reads_the_mask_through_world_coordinates_and_refuses_what_does_not_overlap(tmp_path, capsys, case, message):
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    far = aff.copy()
    far[:3, 3] = 50.0
    _volume(tmp_path / "ref.nii.gz", aff)
    _volume(tmp_path / "rec.nii.gz", far if case == "far" else aff, value=0.0 if case == "zero" else 1.0)
    if case == "zero":
        nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), aff), tmp_path / "rec.nii.gz")
    mask = np.zeros((16, 16, 16), np.uint8)
    mask[4:12, 4:12, 4:12] = 1
    nib.save(nib.Nifti1Image(mask, far if case == "shifted_mask" else aff), tmp_path / "mask.nii.gz")
    code = main(["evaluate", "--input-volume", str(tmp_path / "rec.nii.gz"), "--reference", str(tmp_path / "ref.nii.gz"),
                 "--reference-mask", str(tmp_path / "mask.nii.gz"), "--no-registration"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("flags, message", [(["--noise", "-1"], "noise_level"), (["--thickness", "0"], "thickness_mm"),
                                            (["--corrupted-fraction", "1.5"], "corrupted_fraction")])
def test_simulate_refuses_impossible_protocols_before_any_work(tmp_path, capsys, flags, message):
    _volume(tmp_path / "v.nii.gz", np.eye(4))
    _volume(tmp_path / "m.nii.gz", np.eye(4))
    code = main(["simulate", "--input-volume", str(tmp_path / "v.nii.gz"), "--input-mask", str(tmp_path / "m.nii.gz"),
                 "--output-dir", str(tmp_path / "sim"), *flags])
    assert code == 2 and message in capsys.readouterr().err and not (tmp_path / "sim").exists()


def test_version_names_the_package_version(capsys):
    import gsvr

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"gsvr {gsvr.__version__}"


def test_a_failure_on_a_later_output_leaves_no_output_at_all(tmp_path, capsys, monkeypatch):
    from gsvr.errors import GsvrError
    from gsvr.recon import files


    def disk_full(path, model):
        raise GsvrError(f"{path}: no space left on device")

    monkeypatch.setattr(files, "save_model", disk_full)
    outs = {"--output-volume": "o.nii.gz", "--output-slices-tsv": "s.tsv", "--output-log": "l.tsv", "--output-model": "m.pt"}
    args = [a for flag, name in outs.items() for a in (flag, str(tmp_path / name))]
    code = main([*_small_run(tmp_path, svr_cycles=1, fit_steps=2), *args])
    assert code == 2 and "no space left" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in outs.values()) and not list(tmp_path.glob(".*tmp*"))
