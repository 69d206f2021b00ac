from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import interrupt_and_resume as _interrupt_and_resume
from helpers import stacks_from_simulation

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo" / "GA23"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_paths():
    return {"volume": DEMO / "srr.nii.gz", "mask": DEMO / "mask.nii.gz", "labels": DEMO / "parcellation.nii.gz"}


@pytest.fixture(scope="session")
def small_subject(demo_paths):
    """The demo volume downsampled to 1.6 mm (fast end-to-end tests)."""
    import nibabel as nib
    from scipy import ndimage

    img = nib.load(demo_paths["volume"])
    mask = nib.load(demo_paths["mask"]).get_fdata() > 0
    vol = ndimage.zoom(img.get_fdata().astype(np.float32), 0.5, order=1)
    m = ndimage.zoom(mask.astype(np.float32), 0.5, order=1) > 0.5
    affine = img.affine.copy()
    affine[:3, :3] *= 2.0
    return vol.astype(np.float32), m, affine


@pytest.fixture(scope="session")
def tiny_stacks(small_subject):
    """Three orthogonal stacks simulated from the small subject: 1.6 mm in plane, 4 mm slices, no motion."""
    from gsvr.simulate.stacks import SimulationConfig, simulate_stacks

    vol, mask, affine = small_subject
    sim = simulate_stacks(vol, mask, affine, SimulationConfig(inplane_spacing_mm=1.6, thickness_mm=4.0, noise_level=0.01,
                                                              fov_margin_mm=4.0, through_plane_samples=11, seed=4))
    return stacks_from_simulation(sim)


@pytest.fixture
def interrupt_and_resume(monkeypatch, tmp_path):
    """The interrupt-and-resume harness: ``interrupt_and_resume(stacks, cfg, when)`` runs ``reconstruct`` with a
    checkpoint, interrupts it (KeyboardInterrupt, which must happen) right after the checkpoint ``when`` (the
    n-th save, or ``(stage, step)``), resumes from that checkpoint and returns ``helpers.Resumed(state, result,
    path)``; the caller compares ``result`` with an uninterrupted run."""

    def run(stacks, cfg, when):
        return _interrupt_and_resume(stacks, cfg, tmp_path / "run.ckpt", when, monkeypatch)

    return run

