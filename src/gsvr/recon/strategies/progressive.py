"""M-Gaussian's progressive grid in the joint stage: the Gaussians move to a finer grid at each milestone."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from gsvr.recon.config import ProgressiveConfig
from gsvr.recon.forward import current_positions
from gsvr.recon.state import ProgressiveGrid
from gsvr.recon.strategies.base import Strategy
from gsvr.recon.svr import within_radius

if TYPE_CHECKING:
    from gsvr.recon.stages.joint import JointLoop

log = logging.getLogger(__name__)


def near(points_mm, radius_mm: float):
    """Support test of a grid's nodes: [Q, 3] -> [Q] bool, within ``radius_mm`` of the in-mask pixels."""
    return lambda queries: within_radius(points_mm, queries, radius_mm)


class Progressive(Strategy):
    """At each of ``cfg.milestones`` the field is interpolated onto the grid of the next spacing (active nodes:
    within the support radius of the slices' current pixels); the field's optimiser state restarts."""

    def __init__(self, cfg: ProgressiveConfig, grid: ProgressiveGrid) -> None:
        self.grid = grid
        self.milestones = dict(zip(cfg.milestones, cfg.spacings_mm[1:]))

    def step_pre(self, it: int, loop: "JointLoop") -> bool:
        if it not in self.milestones:
            return False
        x_now = current_positions(loop.data, loop.motion)
        self.grid.grid, new_field = self.grid.grid.refine(loop.field, self.milestones[it], near(x_now, self.grid.radius_mm),
                                                          k=loop.k, knn_backend=loop.model.knn_backend)
        loop.swap_field(new_field, it)
        log.info("progressive grid: %d Gaussians at %.2f mm (step %d)", loop.field.n, self.milestones[it], it)
        return True

    def state_dict(self) -> dict:
        g = self.grid.grid.grid
        return {"progressive_grid": (g.corner_mm, g.spacing_mm, g.shape, self.grid.grid.active.cpu()),
                "progressive_radius": self.grid.radius_mm}
