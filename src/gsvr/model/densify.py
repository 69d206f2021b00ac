"""3DGS-style adaptive density control (Kerbl et al. 2023) for the Gaussian field.

Every ``joint.densify.every`` joint steps, the Gaussians whose mean position gradient (averaged over
the steps since the last control) is in the top ``joint.densify.fraction`` are densified: small ones
(largest scale <= ``split_scale_mm``) are cloned, large ones are split in two, drawn from the Gaussian itself
with scales divided by 1.6 (3DGS's factor). Gaussians whose intensity has vanished (|value| below
``prune_fraction`` of the median |value|) are removed.

gsvr renders a sum of Gaussians, not an alpha blend. In ``exact`` mode (a plain sum) each operation keeps
the rendered volume: a clone and its original each carry half the intensity (the sum is unchanged),
and the two halves of a split carry the intensity that keeps the total mass v * s1 s2 s3. In ``normalized``
mode (a weighted average of the intensities) the new Gaussians keep the intensity itself: halving it would pull
the local average down (a constant field stays constant this way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gsvr.model.field import GaussianField
from gsvr.ops.gaussians import gaussian_covariance

SPLIT_SHRINK = 1.6  #: 3DGS: the two halves of a split get scales / 1.6


@dataclass
class DensifyStats:
    cloned: int
    split: int
    pruned: int


@torch.no_grad()
def densify_and_prune(field: GaussianField, mean_grad: Tensor, *, fraction: float, split_scale_mm: float,
                      prune_fraction: float, max_gaussians: int, generator: torch.Generator) -> tuple[GaussianField, DensifyStats]:
    """A new field with the chosen Gaussians cloned or split and the vanished ones pruned.

    ``mean_grad`` [N]: mean norm of each Gaussian's mean-position gradient since the last control."""
    n = field.n
    vals = field.intensities.detach()
    keep = vals.abs() >= prune_fraction * vals.abs().median()
    room = max(max_gaussians - int(keep.sum()), 0)
    n_grow = min(int(round(fraction * n)), room)
    grow = torch.zeros(n, dtype=torch.bool, device=vals.device)
    if n_grow > 0:
        order = torch.argsort(torch.where(keep, mean_grad, -1.0), descending=True)[:n_grow]
        grow[order] = True
        grow &= keep & (mean_grad > 0)
    scales = torch.exp(field.log_scales.detach())
    large = scales.max(-1).values > split_scale_mm
    clone, split = grow & ~large, grow & large

    means, log_scales, quats = field.means.detach().clone(), field.log_scales.detach().clone(), field.quats.detach().clone()
    values = vals.clone()
    plain_sum = field.mode == "exact"
    if plain_sum:
        values[clone] *= 0.5  # the original keeps half, the clone takes the other half
    new_parts = [(means[clone], log_scales[clone], quats[clone], values[clone])]
    if split.any():
        cov = gaussian_covariance(field.log_scales[split], field.quats[split])
        chol = torch.linalg.cholesky(cov + 1e-9 * torch.eye(3, device=cov.device))
        z = torch.randn(2, int(split.sum()), 3, generator=generator).to(cov.device)
        offsets = (chol[None] @ z[..., None])[..., 0]  # [2, S, 3] samples of each split Gaussian
        shrunk = log_scales[split] - torch.log(torch.tensor(SPLIT_SHRINK))
        # Two halves of scale s / 1.6 carrying the mass v s^3: each v * 1.6^3 / 2 (a plain sum), or v (an average).
        half_value = values[split] * SPLIT_SHRINK ** 3 / 2 if plain_sum else values[split]
        means[split] = means[split] + offsets[0]
        log_scales[split] = shrunk
        values[split] = half_value
        new_parts.append((means[split] - offsets[0] + offsets[1], shrunk, quats[split], half_value))
    parts = [(means[keep], log_scales[keep], quats[keep], values[keep])] + new_parts
    out = GaussianField.with_intensities(*(torch.cat([p[i] for p in parts]) for i in range(4)), mode=field.mode,
                                         intensity=field.intensity)
    return out, DensifyStats(int(clone.sum()), int(split.sum()), int((~keep).sum()))
