"""M-Gaussian's progressive grid: refinement keeps the rendered volume; the engine runs it."""

import numpy as np
import pytest
import torch

from gsvr.model.grid import GaussianGrid
from gsvr.ops.voxel import VoxelGrid
from gsvr.recon.config import ReconConfig
from gsvr.recon.engine import reconstruct


def _smooth(p):
    return 1 + 0.5 * torch.sin(p[:, 0] / 6) * torch.cos(p[:, 1] / 7) + 0.3 * torch.sin(p[:, 2] / 5)


@pytest.mark.parametrize("intensity", ["linear", "softplus"])
def test_refining_the_grid_keeps_the_rendered_volume_at_the_switch(intensity):
    torch.manual_seed(0)
    box = VoxelGrid((-30.0, -30.0, -30.0), 1.0, (61, 61, 61))
    support = lambda p: p.norm(dim=-1) < 28
    coarse = GaussianGrid.inside(box, 3.2, support)
    field = coarse.field(_smooth(coarse.positions()), scale_factor=1.0, mode="exact", intensity=intensity)
    with torch.no_grad():  # an optimised field: Gaussians moved, stretched and turned
        field.log_scales.add_(0.15 * torch.randn_like(field.log_scales))
        field.quats.add_(0.2 * torch.randn_like(field.quats))
        field.means.add_(0.3 * torch.randn_like(field.means))
    fine, refined = coarse.refine(field, 1.6, support, k=32)
    assert refined.intensity == intensity and fine.grid.spacing_mm == 1.6 and 7 < refined.n / field.n < 9  # twice as fine per axis
    # Scales follow the spacing; every new Gaussian sits inside the support.
    ratio = torch.exp(refined.log_scales.mean() - field.log_scales.mean())
    assert abs(float(ratio.detach()) - 0.5) < 0.05
    assert support(fine.positions()).all()
    pts = (torch.rand(8000, 3) - 0.5) * 36
    pts = pts[pts.norm(dim=-1) < 20]  # away from the support's edge
    before, after = field.sample(pts, k=32), refined.sample(pts, k=32)
    err = (before - after).abs() / before.abs()
    assert err.mean() < 0.05 and err.quantile(0.99) < 0.15, (float(err.mean()), float(err.quantile(0.99)))


def test_the_engine_refines_the_grid_at_its_milestones_and_resumes_after_a_refinement(tiny_stacks, interrupt_and_resume):
    stacks = tiny_stacks
    cfg = ReconConfig.from_dict({
        "model": {"k_neighbors": 12, "knn_every": 2}, "output": {"resolution_mm": 1.6},
        "svr": {"spacings_mm": [3.2, 2.4], "stack_spacings_mm": []}, "align": None, "fit": {"steps": 5},
        "joint": {"steps": 6, "progressive": {"spacings_mm": [6.4, 3.2], "milestones": [3]}}, "run": {"checkpoint_every": 2}})
    res = reconstruct(stacks, cfg, progress=False)
    n_coarse = res.model["field"]["means"].shape[0]
    assert np.isfinite(res.volume.data).all() and res.volume.data.max() > 0
    single = reconstruct(stacks, cfg.updated({"joint.progressive": {"spacings_mm": [6.4], "milestones": []}}), progress=False)
    assert 6 < n_coarse / single.model["field"]["means"].shape[0] < 10  # 3.2 mm grid vs 6.4 mm grid
    # Interrupted after the refinement (joint step 4 checkpoint), resumed: the same volume.
    resumed = interrupt_and_resume(stacks, cfg, ("joint", 4)).result
    assert np.array_equal(resumed.volume.data, res.volume.data)
