"""3DGS-style density control: clones and splits keep the rendered volume, vanished Gaussians go."""

import numpy as np
import pytest
import torch

from gsvr.model.densify import densify_and_prune
from gsvr.model.field import GaussianField
from gsvr.recon.config import ReconConfig
from gsvr.recon.engine import reconstruct


def _field(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * 30
    log_scales = torch.log(0.6 + 1.4 * torch.rand(n, 3, generator=g))  # 0.6 - 2.0 mm: some small, some large
    quats = torch.randn(n, 4, generator=g)
    values = 0.5 + torch.rand(n, generator=g)
    values[:10] = 1e-5  # vanished
    return GaussianField(means, log_scales, quats, values, mode="exact")


def test_clones_and_splits_go_where_the_gradient_is_and_vanished_gaussians_are_pruned():
    field = _field()
    grad = torch.zeros(field.n)
    grad[100:140] = 1.0  # the 40 with the largest gradients (10 % of 400)
    grad[:10] = 5.0  # vanished ones are pruned, never grown
    new, stats = densify_and_prune(field, grad, fraction=0.1, split_scale_mm=1.3, prune_fraction=0.02, max_gaussians=10_000,
                                   generator=torch.Generator().manual_seed(1))
    large = torch.exp(field.log_scales[100:140]).max(-1).values > 1.3
    assert stats.pruned == 10 and stats.split == int(large.sum()) and stats.cloned == int((~large).sum())
    assert stats.split > 0 and stats.cloned > 0
    assert new.n == field.n - 10 + 40
    capped, _ = densify_and_prune(field, grad, fraction=0.1, split_scale_mm=1.3, prune_fraction=0.02, max_gaussians=400,
                                  generator=torch.Generator().manual_seed(1))
    assert capped.n <= 400


def test_density_control_keeps_the_rendered_volume():
    field = _field()
    grad = torch.rand(field.n, generator=torch.Generator().manual_seed(3))
    clone_only, _ = densify_and_prune(field, grad, fraction=0.2, split_scale_mm=100.0, prune_fraction=0.02,
                                      max_gaussians=10_000, generator=torch.Generator().manual_seed(1))
    pts = (torch.rand(3000, 3, generator=torch.Generator().manual_seed(4)) - 0.5) * 24
    k = 400  # (nearly) every Gaussian: the comparison is about the field, not the truncation
    before = field.sample(pts, k=k)
    torch.testing.assert_close(clone_only.sample(pts, k=k), before, rtol=1e-4, atol=1e-4)  # a clone halves: exact
    split_all, stats = densify_and_prune(field, grad, fraction=0.2, split_scale_mm=0.1, prune_fraction=0.02,
                                         max_gaussians=10_000, generator=torch.Generator().manual_seed(1))
    assert stats.cloned == 0 and stats.split == 80
    # A split keeps each Gaussian's mass, so the volume integral is kept (a grid sum over the whole field).
    axis = torch.arange(-26.0, 26.0, 1.0)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    total_before, total_after = field.sample(grid, k=64).sum(), split_all.sample(grid, k=64).sum()
    assert float(total_after) == pytest.approx(float(total_before), rel=0.03)


@pytest.mark.parametrize("intensity", ["linear", "softplus"])
def test_in_the_normalized_mode_clones_and_splits_keep_a_constant_field_constant(intensity):
    """The soft-normalised field is a weighted average: new Gaussians keep the intensity (halving it, as the plain
    sum needs, would pull the field down), whatever its parametrisation."""
    field = _field()
    field = GaussianField.with_intensities(field.means, field.log_scales, field.quats, torch.ones(field.n),
                                           mode="normalized", intensity=intensity)
    grad = torch.rand(field.n, generator=torch.Generator().manual_seed(3))
    new, stats = densify_and_prune(field, grad, fraction=0.2, split_scale_mm=1.3, prune_fraction=0.02,
                                   max_gaussians=10_000, generator=torch.Generator().manual_seed(1))
    assert stats.cloned > 0 and stats.split > 0 and new.intensity == intensity
    pts = (torch.rand(2000, 3, generator=torch.Generator().manual_seed(4)) - 0.5) * 24
    torch.testing.assert_close(new.sample(pts, k=32, delta=1e-6), torch.ones(len(pts)), rtol=1e-3, atol=1e-3)


def test_the_engine_densifies_and_resumes_after_a_density_control(tiny_stacks, interrupt_and_resume):
    stacks = tiny_stacks
    cfg = ReconConfig.from_dict({
        "init": {"n_gaussians": 2000}, "model": {"k_neighbors": 12, "knn_every": 2}, "output": {"resolution_mm": 1.6},
        "svr": {"spacings_mm": [3.2, 2.4], "stack_spacings_mm": []}, "align": None, "fit": {"steps": 5},
        "joint": {"steps": 7, "batch_fraction": 0.5, "densify": {"every": 3, "fraction": 0.1}}, "run": {"checkpoint_every": 2}})
    res = reconstruct(stacks, cfg, progress=False)
    assert res.model["field"]["means"].shape[0] > 2000 * 1.15  # two controls, each growing by up to 10 %
    assert np.isfinite(res.volume.data).all()
    # Interrupted after the first density control (step 3), with statistics accumulated since: the same volume.
    resumed = interrupt_and_resume(stacks, cfg, ("joint", 4)).result
    assert np.array_equal(resumed.volume.data, res.volume.data)
