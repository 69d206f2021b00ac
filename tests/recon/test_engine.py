"""The stages' pieces: initial Gaussians from the SVR volume and their fit to it; the stage order."""

import torch

from gsvr.ops.voxel import VoxelGrid
from gsvr.recon.config import FitConfig, InitConfig, ModelConfig
from gsvr.recon.stages import PIPELINE
from gsvr.recon.stages.fit import fit_to_volume
from gsvr.recon.stages.init import field_from_volume
from gsvr.recon.svr import SvrState


def _blob_volume(small_subject):
    vol, mask, _ = small_subject
    v = torch.as_tensor(vol / vol.max(), dtype=torch.float32)
    grid = VoxelGrid((0.0, 0.0, 0.0), 1.6, tuple(v.shape))
    return SvrState(v, grid), torch.as_tensor(mask)


def _rendered_error(field_, state, covered):
    pts = state.grid.points(state.volume.device)[covered]
    return (field_.sample(pts, k=16) - state.volume[covered]).abs().mean().item()


def test_fit_to_the_svr_volume_reproduces_it_better_than_the_sampled_init(small_subject):
    state, covered = _blob_volume(small_subject)
    n = int(covered.sum()) // 2
    model = ModelConfig(k_neighbors=16, knn_every=20)
    field_ = field_from_volume(state, covered, InitConfig(), model, torch.Generator().manual_seed(0), n=n, k=16)
    before = _rendered_error(field_, state, covered)
    steps = []
    fit_to_volume(field_, state, covered, FitConfig(steps=60), model, k=16,
                  on_step=lambda step, loss, opt: steps.append((step, loss)))
    after = _rendered_error(field_, state, covered)
    assert after < 0.5 * before, (before, after)
    assert [s for s, _ in steps] == list(range(1, 61)) and steps[-1][1] < steps[0][1]
    # Resuming at the last step does nothing more.
    means = field_.means.detach().clone()
    fit_to_volume(field_, state, covered, FitConfig(steps=60), model, k=16, start=60)
    assert torch.equal(field_.means, means)


def test_the_pipeline_runs_every_stage_once_in_order_on_its_own_config_section():
    from gsvr.recon.config import ReconConfig

    names = [stage.NAME for stage, _ in PIPELINE]
    assert names == ["prepare", "align", "slices", "svr", "init", "fit", "refine", "joint", "sample"]
    sections = {f for f in ReconConfig.__dataclass_fields__}
    assert all(section in sections for _, section in PIPELINE)
    assert all(callable(stage.run) for stage, _ in PIPELINE)


def test_the_fitted_field_does_not_depend_on_how_many_neighbours_are_summed(small_subject):
    """The field is a sum over all its Gaussians; each point sums only its K nearest. With the default render
    mode, the fitted field sampled with K and with 4K neighbours must agree, or a slice (whose PSF reaches
    further) and the output volume see different fields. The plain sum (``exact``) fails this: the fit grows
    Gaussians whose tails the K nearest never see (docs/results.md, section 16)."""
    state, covered = _blob_volume(small_subject)
    model = ModelConfig(knn_every=20)
    field_ = field_from_volume(state, covered, InitConfig(), model, torch.Generator().manual_seed(0),
                               n=int(covered.sum()) // 4, k=model.k_neighbors)
    fit_to_volume(field_, state, covered, FitConfig(steps=20), model, k=model.k_neighbors)
    pts = state.grid.points(state.volume.device)[covered & (state.volume > 0.2)]
    with torch.no_grad():
        near, far = field_.sample(pts, k=model.k_neighbors, delta=model.delta), field_.sample(pts, k=4 * model.k_neighbors, delta=model.delta)
    assert ((far - near).abs().mean() / near.abs().mean()).item() < 0.05
