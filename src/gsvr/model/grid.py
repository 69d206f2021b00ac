"""M-Gaussian's progressive grid: Gaussians on a uniform grid, refined to a finer grid at milestones.

The field's Gaussians are the active nodes (inside the support) of a :class:`VoxelGrid`. Refining
to a finer spacing interpolates the old parameters at the new nodes, trilinearly and normalised by
the interpolated activity (so inactive nodes do not pull values towards zero): intensities, log
scales (plus log(new / old spacing), which keeps the Gaussians' overlap and hence the rendered
volume), the offsets of the means from their nodes, and the quaternions (made w >= 0, interpolated
and renormalised: M-Gaussian's normalised linear interpolation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gsvr.model.field import GaussianField
from gsvr.ops.voxel import VoxelGrid


@dataclass
class GaussianGrid:
    """The nodes of ``grid`` that carry a Gaussian: ``active`` [N] flat indices into the grid (i-major)."""

    grid: VoxelGrid
    active: Tensor

    @classmethod
    def inside(cls, box: VoxelGrid, spacing_mm: float, support) -> "GaussianGrid":
        """A grid of ``spacing_mm`` over the box of ``box`` whose nodes pass ``support`` ([P, 3] mm -> [P] bool)."""
        extent = [(n - 1) * box.spacing_mm for n in box.shape]
        shape = tuple(max(int(math.ceil(e / spacing_mm)) + 1, 2) for e in extent)
        grid = VoxelGrid(box.corner_mm, float(spacing_mm), shape)
        points = grid.points().reshape(-1, 3)
        return cls(grid, torch.nonzero(support(points))[:, 0])

    def positions(self, device: torch.device | str = "cpu") -> Tensor:
        """[N, 3] node positions (mm)."""
        return self.grid.points(device).reshape(-1, 3)[self.active.to(device)]

    def field(self, values: Tensor, *, scale_factor: float, mode: str, intensity: str = "linear") -> GaussianField:
        """Isotropic Gaussians at the nodes with intensities ``values``, standard deviation ``scale_factor`` x spacing."""
        pos = self.positions(values.device)
        log_scales = torch.full_like(pos, math.log(scale_factor * self.grid.spacing_mm))
        quats = torch.zeros(len(pos), 4, device=pos.device)
        quats[:, 0] = 1.0
        return GaussianField.with_intensities(pos, log_scales, quats, values, mode=mode, intensity=intensity)

    def _dense(self, channels: Tensor) -> Tensor:
        """[N, C] on the active nodes -> [1, C + 1, I, J, K] (last channel: activity)."""
        n_nodes = math.prod(self.grid.shape)
        dense = channels.new_zeros(n_nodes, channels.shape[1] + 1)
        dense[self.active.to(channels.device), :-1] = channels
        dense[self.active.to(channels.device), -1] = 1.0
        return dense.T.reshape(1, -1, *self.grid.shape)

    @torch.no_grad()
    def refine(self, field: GaussianField, spacing_mm: float, support, *, k: int,
               knn_backend: str = "auto") -> tuple["GaussianGrid", GaussianField]:
        """The grid at ``spacing_mm`` (same box) and the field interpolated onto it.

        Interpolated parameters alone change the rendered volume (a finer lattice blurs the same
        intensities less, and averaging log scales changes each Gaussian's mass); the new intensities
        are therefore multiplied by old / new rendered value at the new means (``k`` neighbours, as the
        renderer uses), so the field before and after the switch agree at the nodes."""
        new = GaussianGrid.inside(self.grid, spacing_mm, support)
        dev = field.means.device
        old_pos = self.positions(dev)
        quats = F.normalize(field.quats, dim=-1)
        quats = quats * torch.where(quats[:, :1] < 0, -1.0, 1.0)
        channels = torch.cat([field.intensities.detach()[:, None], field.log_scales, field.means - old_pos, quats], -1)  # [N, 11]
        pos = new.positions(dev)
        coords = self.grid.normalised(pos)[None, :, None, None, :]
        samp = F.grid_sample(self._dense(channels), coords, mode="bilinear", align_corners=True)[0, :, :, 0, 0].T  # [N', 12]
        weight = samp[:, -1:]
        known = weight[:, 0] > 1e-6
        mean = samp[:, :-1] / weight.clamp_min(1e-6)
        values = torch.where(known, mean[:, 0], 0.0)
        log_scales = torch.where(known[:, None], mean[:, 1:4], math.log(self.grid.spacing_mm)) + math.log(spacing_mm / self.grid.spacing_mm)
        offsets = torch.where(known[:, None], mean[:, 4:7], 0.0)  # a displacement field: kept as it is
        identity = torch.tensor([1.0, 0.0, 0.0, 0.0], device=dev)
        quats = torch.where(known[:, None], F.normalize(mean[:, 7:11], dim=-1), identity)
        refined = GaussianField(pos + offsets, log_scales, quats, values, mode=field.mode)
        before = field.sample(refined.means, k=k, knn_backend=knn_backend)
        after = refined.sample(refined.means, k=k, knn_backend=knn_backend)
        safe = after.abs() > 1e-6
        ratio = torch.where(safe, before / torch.where(safe, after, 1.0), 1.0)
        return new, GaussianField.with_intensities(refined.means, log_scales, quats, values * ratio.clamp(0.25, 4.0),
                                                   mode=field.mode, intensity=field.intensity)
