from pathlib import Path

import numpy as np
import pytest
import torch

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
    from gsvr.io.nifti import Stack
    from gsvr.simulate.stacks import SimulationConfig, simulate_stacks

    vol, mask, affine = small_subject
    sim = simulate_stacks(vol, mask, affine, SimulationConfig(inplane_spacing_mm=1.6, thickness_mm=4.0, noise_level=0.01,
                                                              fov_margin_mm=4.0, through_plane_samples=11, seed=4))
    return [Stack(data=s.data, mask=s.mask > 0, affine=s.affine, thickness_mm=s.thickness_mm, name=f"s{k}")
            for k, s in enumerate(sim.stacks)]

