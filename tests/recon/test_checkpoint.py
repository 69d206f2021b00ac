"""Checkpoints: an interrupted run resumed from its checkpoint ends exactly where an uninterrupted one does."""

import json

import nibabel as nib
import numpy as np
import pytest
import yaml
from helpers import interrupted_at_save, stacks_from_simulation

from gsvr.cli import main
from gsvr.errors import GsvrError
from gsvr.recon.config import ReconConfig
from gsvr.recon.engine import reconstruct
from gsvr.simulate.stacks import SimulationConfig, simulate_stacks

SIM = dict(inplane_spacing_mm=1.6, thickness_mm=4.0, noise_level=0.01, fov_margin_mm=4.0, through_plane_samples=11)
# Every stage runs and is checkpointed: 6 SVR cycles (2 whole-stack, 3 slice, 1 on the output grid), 20 fit steps (checkpoints at 5, 10, 15
# and 20), the refinement (one checkpoint when it ends), 20 joint steps on half batches (random).
# (No stack multi-start: it runs before the first checkpoint and only costs time here.)
CFG = ReconConfig.from_dict({
    "init": {"n_gaussians": 3000}, "model": {"k_neighbors": 12, "knn_every": 5}, "output": {"resolution_mm": 1.6},
    "svr": {"spacings_mm": [3.2, 2.4, 2.4]}, "align": None, "fit": {"steps": 20}, "refine": {"max_steps": 6},
    "joint": {"steps": 20, "batch_fraction": 0.5},
    "slice_weights": {"every": 5}, "run": {"checkpoint_every": 5}})


@pytest.fixture(scope="module")
def stacks(small_subject):
    vol, mask, affine = small_subject
    sim = simulate_stacks(vol, mask, affine, SimulationConfig(motion_rotation_deg=3.0, motion_translation_mm=2.0, seed=4, **SIM))
    return stacks_from_simulation(sim)


@pytest.fixture(scope="module")
def uninterrupted(stacks):
    return reconstruct(stacks, CFG, progress=False)


@pytest.mark.parametrize("n_saves,stage,step", [(2, "svr", 2), (8, "fit", 10), (11, "refine", None), (14, "joint", 15)])
def test_resume_from_each_stage_gives_the_uninterrupted_result(stacks, uninterrupted, interrupt_and_resume, n_saves, stage, step):
    state, resumed, path = interrupt_and_resume(stacks, CFG, n_saves)
    if step is None:  # the refinement's checkpoint: the steps it chose, then its registration rounds' (which move slices)
        step = int((uninterrupted.history.stage == "refine").sum())
        assert (uninterrupted.history.stage == "refine_register").any()
    assert (state["stage"], state["step"]) == (stage, step)
    assert np.array_equal(resumed.volume.data, uninterrupted.volume.data)
    assert resumed.slices.equals(uninterrupted.slices)
    assert resumed.history[["step", "stage", "value"]].equals(uninterrupted.history[["step", "stage", "value"]])
    assert not path.exists()  # removed once the run completed


def test_a_checkpoint_of_other_settings_is_refused(stacks, tmp_path, monkeypatch):
    path = tmp_path / "run.ckpt"
    with interrupted_at_save(monkeypatch, 1), pytest.raises(KeyboardInterrupt):
        reconstruct(stacks, CFG, progress=False, checkpoint=str(path))
    with pytest.raises(GsvrError, match="other stacks or settings"):
        reconstruct(stacks, CFG.updated({"run.seed": 1}), progress=False, checkpoint=str(path), resume=True)
    with pytest.raises(GsvrError, match="--resume needs --checkpoint"):
        reconstruct(stacks, CFG, progress=False, resume=True)


def test_the_command_line_interrupt_leaves_a_checkpoint_and_no_volume_and_resume_completes(stacks, tmp_path, monkeypatch, capsys):
    paths = []
    for s in stacks:
        nib.save(nib.Nifti1Image(s.data, s.affine), tmp_path / f"{s.name}.nii.gz")
        nib.save(nib.Nifti1Image(s.mask.astype(np.uint8), s.affine), tmp_path / f"{s.name}_mask.nii.gz")
        paths.append(s.name)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(CFG.to_dict()))))  # tuples as lists
    args = ["reconstruct", "--input-stacks", *[str(tmp_path / f"{p}.nii.gz") for p in paths],
            "--stack-masks", *[str(tmp_path / f"{p}_mask.nii.gz") for p in paths], "--thicknesses", "4", "4", "4",
            "--config", str(tmp_path / "cfg.yaml"), "--no-progress"]
    assert main([*args, "--output-volume", str(tmp_path / "reference.nii.gz")]) == 0  # uninterrupted, from the same files
    args += ["--output-volume", str(tmp_path / "out.nii.gz"), "--checkpoint", str(tmp_path / "run.ckpt")]
    with interrupted_at_save(monkeypatch, 6):
        assert main(args) == 130
    assert "--resume --checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out.nii.gz").exists() and (tmp_path / "run.ckpt").exists()
    assert main([*args, "--resume"]) == 0
    assert np.array_equal(nib.load(tmp_path / "out.nii.gz").get_fdata(dtype=np.float32),
                          nib.load(tmp_path / "reference.nii.gz").get_fdata(dtype=np.float32))
    assert not (tmp_path / "run.ckpt").exists()
