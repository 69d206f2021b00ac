"""A volume as N anisotropic 3D Gaussians (mean, log-scales, quaternion, intensity)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsvr.errors import GsvrError
from gsvr.ops.gaussians import gaussian_sum, pair_tables
from gsvr.ops.knn import knn


class GaussianField(nn.Module):
    """Learnable Gaussian primitives; positions are millimetres relative to ``origin_mm``.

    Attributes:
        means: [N, 3] centres (mm).
        log_scales: [N, 3] log standard deviations along the principal axes (log mm).
        quats: [N, 4] rotations (w, x, y, z), unnormalised.
        values: [N] the intensity parameters: the intensities themselves (``intensity="linear"``) or
            their inverse softplus (``"softplus"``: intensities never negative, GSVR's public code).
    """

    def __init__(self, means: Tensor, log_scales: Tensor, quats: Tensor, values: Tensor, *, mode: str,
                 intensity: str = "linear") -> None:
        super().__init__()
        if intensity not in ("linear", "softplus"):
            raise GsvrError(f"unknown intensity parametrisation {intensity!r} (a model of another gsvr version?)")
        self.means = nn.Parameter(means.float())
        self.log_scales = nn.Parameter(log_scales.float())
        self.quats = nn.Parameter(quats.float())
        self.values = nn.Parameter(values.float())
        self.mode = mode
        self.intensity = intensity

    @classmethod
    def with_intensities(cls, means: Tensor, log_scales: Tensor, quats: Tensor, intensities: Tensor, *, mode: str,
                         intensity: str = "linear") -> "GaussianField":
        """A field whose Gaussians have the intensities [N] (their parameters derived for ``intensity``)."""
        if intensity == "softplus":  # the inverse softplus; above 20 softplus(x) = x in float32
            v = intensities.float().clamp_min(1e-6)
            intensities = torch.where(v > 20, v, torch.log(torch.expm1(v.clamp_max(20))))
        return cls(means, log_scales, quats, intensities, mode=mode, intensity=intensity)

    @property
    def intensities(self) -> Tensor:
        """[N] the Gaussians' intensities (differentiable)."""
        return F.softplus(self.values) if self.intensity == "softplus" else self.values

    @torch.no_grad()
    def replace_with(self, other: "GaussianField") -> None:
        """Take over ``other``'s Gaussians (new Parameters: the number of Gaussians may change)."""
        for name in ("means", "log_scales", "quats", "values"):
            setattr(self, name, nn.Parameter(getattr(other, name).detach().clone()))
        self.intensity = other.intensity

    @property
    def n(self) -> int:
        return self.means.shape[0]

    def param_groups(self, lr) -> list[dict]:
        """Optimiser parameter groups, each with its learning rate (``lr``: a
        :class:`gsvr.recon.config.FieldRates`, whose means, scales, quats and values name them)."""
        return [{"params": [self.means], "lr": lr.means}, {"params": [self.log_scales], "lr": lr.scales},
                {"params": [self.quats], "lr": lr.quats}, {"params": [self.values], "lr": lr.values}]

    def tables(self) -> "object":
        """Per-Gaussian tables without PSF (for sampling the volume itself)."""
        ids = torch.arange(self.n, device=self.means.device)
        return pair_tables(self.means, self.log_scales, self.quats, self.intensities, None, ids, ids, mode=self.mode)

    @torch.no_grad()
    def sample(self, points: Tensor, *, k: int, knn_backend: str = "auto", chunk: int = 65536, delta: float = 1e-4) -> Tensor:
        """V(x) at points [P, 3] (mm, same frame as the means) -> [P]."""
        tables = self.tables()
        k = min(k, self.n)
        out = torch.empty(len(points), device=points.device)
        for start in range(0, len(points), chunk):
            pts = points[start : start + chunk]
            nbr = knn(self.means, pts, k, backend=knn_backend)
            out[start : start + chunk] = gaussian_sum(pts, nbr, tables, mode=self.mode, delta=delta)
        return out

    def state(self) -> dict:
        """A snapshot of the field on the CPU (copies: later steps do not change it, nor does a field made from it)."""
        return {
            "means": self.means.detach().to("cpu", copy=True),
            "log_scales": self.log_scales.detach().to("cpu", copy=True),
            "quats": self.quats.detach().to("cpu", copy=True),
            "values": self.values.detach().to("cpu", copy=True),
            "mode": self.mode,
            "intensity": self.intensity,
        }

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str = "cpu") -> "GaussianField":
        return cls(*(state[k].to(device) for k in ("means", "log_scales", "quats", "values")), mode=state["mode"],
                   intensity=state.get("intensity", "linear"))


def content_adaptive_init(
    positions: Tensor,
    values: Tensor,
    grad_mag: Tensor,
    jitter_mm: Tensor,
    *,
    n: int,
    lambda_init: float,
    mode: str,
    k: int,
    scale_bounds_mm: tuple[float, float],
    generator: torch.Generator,
    knn_backend: str = "auto",
    intensity: str = "linear",
) -> GaussianField:
    """GSVR Sec. 2.5: sample means from slice pixels with P ~ (1 - lambda) |grad I| + lambda.

    Args:
        positions: [P, 3] pixel world positions (header geometry).
        values: [P] normalised pixel intensities.
        grad_mag: [P] in-plane gradient magnitude of each pixel.
        jitter_mm: [P, 3] half-extent of a pixel's footprint along world axes, for uniform jitter.
        n: number of Gaussians.
        lambda_init: 0 = all from gradients, 1 = uniform.
        mode: render mode; in ``exact`` mode intensities are divided by the local overlap so
            the initial field reproduces the sampled values.
        k: neighbours used for the overlap correction.
        scale_bounds_mm: clamp of the initial isotropic scale.
        intensity: the field's intensity parametrisation (:class:`GaussianField`).
    """
    device = positions.device
    g = grad_mag / grad_mag.mean().clamp_min(1e-12)
    prob = (1.0 - lambda_init) * g + lambda_init
    prob = prob.clamp_min(1e-12).cpu().double()
    n_pix = len(positions)
    ids = torch.multinomial(prob, n, replacement=n > n_pix, generator=generator).to(device)
    noise = (torch.rand(n, 3, generator=generator).to(device) * 2.0 - 1.0)
    means = positions[ids] + noise * jitter_mm[ids]
    # Isotropic initial scale: mean distance to the 3 nearest other means (3DGS), clamped.
    nbr = knn(means, means, 4, backend=knn_backend)
    dist = (means[nbr[:, 1:]] - means[:, None, :]).norm(dim=-1).mean(-1)
    scale = dist.clamp(*scale_bounds_mm)
    log_scales = scale.log()[:, None].repeat(1, 3)
    quats = torch.zeros(n, 4, device=device)
    quats[:, 0] = 1.0
    initial = values[ids].clone()
    if mode == "exact":
        ones = GaussianField(means, log_scales, quats, torch.ones(n, device=device), mode=mode)
        initial = initial / ones.sample(means, k=k, knn_backend=knn_backend).clamp_min(1.0)
    return GaussianField.with_intensities(means, log_scales, quats, initial, mode=mode, intensity=intensity)

