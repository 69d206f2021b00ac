"""Provenance sidecars (gsvr.provenance): every output volume gets one, and it repeats the run."""

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
import torch

import gsvr
from gsvr.cli import main
from gsvr.errors import GsvrError
from gsvr.provenance import FORMAT, read_settings, sidecar_path
from gsvr.recon.config import ReconConfig


def _tiny_run(tmp_path) -> list[str]:
    """Two small stacks and a config that reconstructs them in a few seconds: the arguments for them."""
    stacks = [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]
    for k, s in enumerate(stacks):
        data = np.random.default_rng(k).random((12, 12, 6)).astype(np.float32) + 1
        nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 3.0, 1.0])), s)
    (tmp_path / "cfg.yaml").write_text("init: {n_gaussians: 200}\nsvr: {spacings_mm: [3.0], stack_spacings_mm: []}\n"
                                       "fit: {steps: 3}\nalign: null\noutput: {resolution_mm: 2.0}\n")
    return ["--input-stacks", *map(str, stacks), "--config", str(tmp_path / "cfg.yaml"), "--no-progress"]


@pytest.mark.parametrize("volume, sidecar", [("out/v.nii.gz", "out/v.json"), ("v.nii", "v.json"), ("a.b.nii.gz", "a.b.json")])
def test_the_sidecar_is_the_volume_with_json_for_the_nifti_suffix(volume, sidecar):
    assert sidecar_path(volume).as_posix() == sidecar


def test_the_sidecar_records_the_run_and_its_settings_repeat_it_bit_for_bit(tmp_path, capsys):
    args = _tiny_run(tmp_path)
    first, again = tmp_path / "first.nii.gz", tmp_path / "again.nii.gz"
    assert main(["reconstruct", *args, "--thicknesses", "3", "2.5", "--seed", "7", "--output-volume", str(first)]) == 0
    record = json.loads((tmp_path / "first.json").read_text())
    assert record["format"] == FORMAT and record["gsvr_version"] == gsvr.__version__ and record["method"] == "gsvr"
    # The resolved settings: the config file, the flags and the defaults.
    assert ReconConfig.from_dict(record["settings"]) == ReconConfig.from_yaml(tmp_path / "cfg.yaml").updated({"run.seed": 7})
    stack = tmp_path / "a.nii.gz"
    assert record["inputs"][0] == {"stack": str(stack), "sha256": hashlib.sha256(stack.read_bytes()).hexdigest(),
                                   "thickness_mm": 3.0, "mask": None, "mask_sha256": None}
    assert [i["thickness_mm"] for i in record["inputs"]] == [3.0, 2.5]
    assert record["command"][:2] == ["gsvr", "reconstruct"] and "--seed" in record["command"]
    assert record["device"] == "cpu" and record["torch_version"] == torch.__version__
    assert record["wall_s"] > 0 and record["peak_rss_mb"] > 0 and record["cuda_max_memory_allocated_mb"] is None

    # The sidecar itself is a --config: the same inputs give the same volume, without the flags.
    assert main(["reconstruct", *[a if a != str(tmp_path / "cfg.yaml") else str(tmp_path / "first.json") for a in args],
                 "--thicknesses", "3", "2.5", "--output-volume", str(again)]) == 0
    a, b = nib.load(first), nib.load(again)
    assert np.array_equal(a.get_fdata(), b.get_fdata()) and np.array_equal(a.affine, b.affine)
    assert json.loads((tmp_path / "again.json").read_text())["settings"] == record["settings"]
    # Its settings member written out as YAML is a config too.
    (tmp_path / "settings.yaml").write_text(json.dumps(record["settings"]))
    assert read_settings(tmp_path / "settings.yaml") == read_settings(tmp_path / "first.json") == record["settings"]


def test_svr_writes_a_sidecar_that_reconstruct_refuses(tmp_path, capsys):
    out = tmp_path / "svr.nii.gz"
    assert main(["svr", *_tiny_run(tmp_path), "--output-volume", str(out)]) == 0
    record = json.loads((tmp_path / "svr.json").read_text())
    assert record["method"] == "svr_classic" and record["device"] == "cpu"
    capsys.readouterr()
    code = main(["reconstruct", "--input-stacks", str(tmp_path / "a.nii.gz"), "--config", str(tmp_path / "svr.json"),
                 "--output-volume", str(tmp_path / "r.nii.gz")])
    err = capsys.readouterr().err
    assert code == 2 and "sidecar of method svr_classic" in err and "gsvr svr" in err
    with pytest.raises(GsvrError, match="not gsvr"):
        read_settings(tmp_path / "svr.json", method="gsvr")


def test_an_output_named_like_the_sidecar_is_refused_before_any_work(tmp_path, capsys):
    code = main(["reconstruct", *_tiny_run(tmp_path), "--output-volume", str(tmp_path / "o.nii.gz"),
                 "--output-log", str(tmp_path / "o.json")])
    assert code == 2 and "the sidecar of --output-volume" in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()


def test_a_failure_writing_the_sidecar_leaves_no_output(tmp_path, capsys, monkeypatch):
    from gsvr.recon import files

    def disk_full(path, record):
        raise GsvrError(f"{path}: no space left on device")

    monkeypatch.setattr(files, "write_sidecar", disk_full)
    code = main(["reconstruct", *_tiny_run(tmp_path), "--output-volume", str(tmp_path / "o.nii.gz"),
                 "--output-slices-tsv", str(tmp_path / "s.tsv")])
    assert code == 2 and "no space left" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in ("o.nii.gz", "o.json", "s.tsv")) and not list(tmp_path.glob(".*tmp*"))
