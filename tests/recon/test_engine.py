"""Engine pieces: the fit of the initial Gaussians to the SVR volume."""

import torch
from tqdm.auto import tqdm

from gsvr.ops.voxel import VoxelGrid
from gsvr.recon.config import ReconConfig
from gsvr.recon.engine import _fit_to_volume, _init_field_from_volume
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
    cfg = ReconConfig(k_neighbors=16, init_fit_steps=60, knn_every=20)
    gen = torch.Generator().manual_seed(0)
    field_ = _init_field_from_volume(state, covered, cfg, gen, n=n, k=16)
    before = _rendered_error(field_, state, covered)
    with tqdm(disable=True) as bar:
        _fit_to_volume(field_, state, covered, cfg, bar, k=16)
    after = _rendered_error(field_, state, covered)
    assert after < 0.5 * before, (before, after)
    # A zero-step fit leaves the field untouched.
    field2 = _init_field_from_volume(state, covered, cfg, torch.Generator().manual_seed(0), n=n, k=16)
    means = field2.means.detach().clone()
    with tqdm(disable=True) as bar:
        _fit_to_volume(field2, state, covered, ReconConfig(init_fit_steps=0), bar, k=16)
    assert torch.equal(field2.means, means)
