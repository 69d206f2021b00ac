"""The progressive-grid strategy: it refines at its milestones only, onto the next spacing."""

from types import SimpleNamespace

import torch

from gsvr.model.grid import GaussianGrid
from gsvr.ops.voxel import VoxelGrid
from gsvr.recon.config import ModelConfig, ProgressiveConfig
from gsvr.recon.slices import SliceMotion
from gsvr.recon.state import ProgressiveGrid
from gsvr.recon.strategies import Progressive


def test_the_grid_is_refined_at_each_milestone_to_the_next_spacing_and_kept_in_between():
    box = VoxelGrid((0.0, 0.0, 0.0), 1.0, (25, 25, 25))
    pixels = box.points().reshape(-1, 3)[::7]  # "slice pixels" all over the box
    grid = GaussianGrid.inside(box, 6.0, lambda q: torch.ones(len(q), dtype=torch.bool))
    field = grid.field(torch.ones(len(grid.active)), scale_factor=1.0, mode="exact")
    data = SimpleNamespace(x0=pixels, slice_idx=torch.zeros(len(pixels), dtype=torch.long), centre=pixels.mean(0, keepdim=True))
    loop = SimpleNamespace(field=field, data=data, motion=SliceMotion(1, torch.device("cpu")), k=8, model=ModelConfig(),
                           swaps=[])
    loop.swap_field = lambda new, at: (loop.swaps.append(at), field.replace_with(new))
    holder = ProgressiveGrid(grid, radius_mm=30.0)
    s = Progressive(ProgressiveConfig(spacings_mm=(6.0, 3.0), milestones=(4,)), holder)
    n0 = field.n
    assert not s.step_pre(3, loop) and field.n == n0
    assert s.step_pre(4, loop) and loop.swaps == [4]
    assert holder.grid.grid.spacing_mm == 3.0 and field.n > 4 * n0
    torch.testing.assert_close(field.means.detach(), holder.grid.positions(), atol=1e-4, rtol=0)
    assert set(s.state_dict()) == {"progressive_grid", "progressive_radius"}
