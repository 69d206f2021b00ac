"""Checkpoints: an interrupted run resumed from its checkpoint ends exactly where an uninterrupted one does."""

import nibabel as nib
import numpy as np
import pytest
import torch

from gsvr.cli import main
from gsvr.errors import GsvrError
from gsvr.io.nifti import Stack
from gsvr.recon import checkpoint as ckmod
from gsvr.recon.config import ReconConfig
from gsvr.recon.engine import reconstruct
from gsvr.simulate.stacks import SimulationConfig, simulate_stacks

SIM = dict(inplane_spacing_mm=1.6, thickness_mm=4.0, noise_level=0.01, fov_margin_mm=4.0, through_plane_samples=11)
# Every stage runs and is checkpointed: 5 SVR cycles (2 whole-stack, 3 slice), 20 fit steps, 20 joint steps on half
# batches (random).
# (No stack multi-start: it runs before the first checkpoint and only costs time here.)
CFG = ReconConfig(n_gaussians=3000, k_neighbors=12, output_resolution_mm=1.6, seed=0, svr_spacings_mm=(3.2, 2.4, 2.4), registration="none",
                  init_fit_steps=20, iterations=20, knn_every=5, weight_every=5, checkpoint_every=5, batch_fraction=0.5)


@pytest.fixture(scope="module")
def stacks(small_subject):
    vol, mask, affine = small_subject
    sim = simulate_stacks(vol, mask, affine, SimulationConfig(motion_rotation_deg=3.0, motion_translation_mm=2.0, seed=4, **SIM))
    return [Stack(data=s.data, mask=s.mask > 0, affine=s.affine, thickness_mm=s.thickness_mm, name=f"s{k}")
            for k, s in enumerate(sim.stacks)]


@pytest.fixture(scope="module")
def uninterrupted(stacks):
    return reconstruct(stacks, CFG, progress=False)


def _interrupt_after(monkeypatch, n_saves):
    original = ckmod.Checkpointer.save
    count = [0]

    def save(self, *args, **kwargs):
        original(self, *args, **kwargs)
        count[0] += 1
        if count[0] == n_saves:
            raise KeyboardInterrupt

    monkeypatch.setattr(ckmod.Checkpointer, "save", save)


@pytest.mark.parametrize("n_saves,stage,step", [(2, "svr", 2), (7, "fit", 10), (11, "joint", 15)])
def test_resume_from_each_stage_gives_the_uninterrupted_result(stacks, uninterrupted, tmp_path, monkeypatch, n_saves, stage, step):
    path = tmp_path / "run.ckpt"
    with monkeypatch.context() as m:
        _interrupt_after(m, n_saves)
        with pytest.raises(KeyboardInterrupt):
            reconstruct(stacks, CFG, progress=False, checkpoint=str(path))
    state = torch.load(path, weights_only=False)
    assert (state["stage"], state["step"]) == (stage, step)
    resumed = reconstruct(stacks, CFG, progress=False, checkpoint=str(path), resume=True)
    assert np.array_equal(resumed.volume.data, uninterrupted.volume.data)
    assert resumed.slices.equals(uninterrupted.slices)
    assert resumed.history[["step", "stage", "value"]].equals(uninterrupted.history[["step", "stage", "value"]])
    assert not path.exists()  # removed once the run completed


def test_a_checkpoint_of_other_settings_is_refused(stacks, tmp_path, monkeypatch):
    path = tmp_path / "run.ckpt"
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            reconstruct(stacks, CFG, progress=False, checkpoint=str(path))
    with pytest.raises(GsvrError, match="other stacks or settings"):
        reconstruct(stacks, CFG.replace(seed=1), progress=False, checkpoint=str(path), resume=True)
    with pytest.raises(GsvrError, match="--resume needs --checkpoint"):
        reconstruct(stacks, CFG, progress=False, resume=True)


def test_the_command_line_interrupt_leaves_a_checkpoint_and_no_volume_and_resume_completes(stacks, tmp_path, monkeypatch, capsys):
    paths = []
    for s in stacks:
        nib.save(nib.Nifti1Image(s.data, s.affine), tmp_path / f"{s.name}.nii.gz")
        nib.save(nib.Nifti1Image(s.mask.astype(np.uint8), s.affine), tmp_path / f"{s.name}_mask.nii.gz")
        paths.append(s.name)
    (tmp_path / "cfg.yaml").write_text("\n".join(f"{k}: {list(v) if isinstance(v, tuple) else v}" for k, v in CFG.to_dict().items()))
    args = ["reconstruct", "--input-stacks", *[str(tmp_path / f"{p}.nii.gz") for p in paths],
            "--stack-masks", *[str(tmp_path / f"{p}_mask.nii.gz") for p in paths], "--thicknesses", "4", "4", "4",
            "--config", str(tmp_path / "cfg.yaml"), "--no-progress"]
    assert main([*args, "--output-volume", str(tmp_path / "reference.nii.gz")]) == 0  # uninterrupted, from the same files
    args += ["--output-volume", str(tmp_path / "out.nii.gz"), "--checkpoint", str(tmp_path / "run.ckpt")]
    with monkeypatch.context() as m:
        _interrupt_after(m, 6)
        assert main(args) == 130
    assert "--resume --checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out.nii.gz").exists() and (tmp_path / "run.ckpt").exists()
    assert main([*args, "--resume"]) == 0
    assert np.array_equal(nib.load(tmp_path / "out.nii.gz").get_fdata(dtype=np.float32),
                          nib.load(tmp_path / "reference.nii.gz").get_fdata(dtype=np.float32))
    assert not (tmp_path / "run.ckpt").exists()
