"""Neural residual field (M-Gaussian Sec. 3.4): a small MLP adding a bounded residual to intensities.

Fourier features of the position (``bands`` octaves), ``layers`` hidden layers of ``hidden`` SiLU
units, and an output ``bound * tanh(.)``. M-Gaussian adds it to the rendered intensity; gsvr adds it
to each Gaussian's intensity at the Gaussian's mean instead, so the slice PSF still blurs all of the
signal exactly (a residual added per pixel would escape the PSF) and the result is again a plain
Gaussian field: :meth:`bake` folds the residual into the intensities, and sampling the volume at
any resolution works unchanged. The output layer starts at zero, so switching the field on (after
``joint.residual_field.start`` steps) does not disturb the reconstruction.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class ResidualField(nn.Module):
    def __init__(self, *, bands: int = 6, hidden: int = 64, layers: int = 4, bound: float = 0.1,
                 extent_mm: float = 100.0) -> None:
        super().__init__()
        self.bands, self.bound, self.extent_mm = bands, bound, extent_mm
        dims = [3 + 6 * bands] + [hidden] * layers
        body = []
        for a, b in zip(dims[:-1], dims[1:]):
            body += [nn.Linear(a, b), nn.SiLU()]
        self.body = nn.Sequential(*body)
        self.head = nn.Linear(dims[-1], 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def encode(self, x_mm: Tensor) -> Tensor:
        """[N, 3] mm -> [N, 3 + 6 bands]: x and sin/cos(2^b pi x) of x scaled to about [-1, 1]."""
        x = x_mm / self.extent_mm
        freq = (2.0 ** torch.arange(self.bands, device=x.device, dtype=x.dtype)) * math.pi
        ang = (x[:, :, None] * freq).flatten(1)
        return torch.cat([x, torch.sin(ang), torch.cos(ang)], -1)

    def forward(self, x_mm: Tensor) -> Tensor:
        """Residual [N] in (-bound, bound) at the positions [N, 3] (mm)."""
        return self.bound * torch.tanh(self.head(self.body(self.encode(x_mm)))[:, 0])

    @torch.no_grad()
    def bake(self, means: Tensor, values: Tensor, chunk: int = 65536) -> None:
        """Add the residual at ``means`` [N, 3] to ``values`` [N] in place."""
        for start in range(0, len(means), chunk):
            values[start : start + chunk] += self(means[start : start + chunk])
