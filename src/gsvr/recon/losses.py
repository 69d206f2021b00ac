"""Slice losses of the joint optimisation, switched by configuration.

Pixel terms (every pixel on its own): ``l1`` (GSVR) or ``smooth_l1`` (M-Gaussian's Huber loss).
Whole-slice terms, on the pixels laid out as slice images (zero outside the masks):
D-SSIM = 1 - SSIM (M-Gaussian, GaussianSVR; torchmetrics' Gaussian-window SSIM, averaged over the
in-mask pixels of each slice) and total variation of the predicted slices (GaussianSVR; the mean
absolute in-plane difference between neighbouring in-mask pixels).

The whole-slice terms need every pixel of a slice at once, while the pixel terms are
back-propagated chunk by chunk to bound memory. :func:`slice_image_terms` therefore takes the
predicted pixels without a graph and returns the terms' gradient with respect to them; the engine
adds ``<gradient, prediction>`` to each chunk's loss, which back-propagates exactly that gradient.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from gsvr.errors import GsvrError
from gsvr.recon.slices import SliceData

if TYPE_CHECKING:
    from gsvr.model.field import GaussianField
    from gsvr.recon.config import LossConfig
    from gsvr.recon.slices import SliceMotion

PIXEL_LOSSES = ("l1", "smooth_l1")


def pixel_loss(pred: Tensor, y: Tensor, kind: str, beta: float) -> Tensor:
    """Per-pixel data term [p]."""
    if kind == "l1":
        return (pred - y).abs()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, y, beta=beta, reduction="none")
    raise GsvrError(f"config: loss must be one of {PIXEL_LOSSES}, got {kind!r}")


class SliceImages:
    """Scatter of pixel values [P] into slice images [M, 1, H, W] (H, W: the largest mask bounding box)."""

    def __init__(self, data: SliceData) -> None:
        self.n_slices = data.n_slices
        self.shape = tuple(int(v) + 1 for v in data.pixel_ij.max(0).values.tolist())
        h, w = self.shape
        self.sid = data.slice_idx
        self.flat = data.slice_idx * (h * w) + data.pixel_ij[:, 0] * w + data.pixel_ij[:, 1]  # [P]
        inside = torch.zeros(self.n_slices * h * w, dtype=torch.bool, device=data.x0.device)
        inside[self.flat] = True
        self.inside = inside.view(self.n_slices, 1, h, w)

    def images(self, values: Tensor, pixels: Tensor | None = None) -> Tensor:
        """[M, 1, H, W] with ``values`` at the pixels (all, or the indices ``pixels``), zero elsewhere."""
        flat = self.flat if pixels is None else self.flat[pixels]
        out = values.new_zeros(self.n_slices * self.shape[0] * self.shape[1])
        out = out.index_put((flat,), values)
        return out.view(self.n_slices, 1, *self.shape)


def slice_image_terms(images: SliceImages, pred: Tensor, y: Tensor, pixels: Tensor | None, slice_weight: Tensor, *,
                      ssim_weight: float, tv_weight: float, window: int = 11, sigma: float = 1.5,
                      data_range: float = 1.0) -> tuple[float, Tensor]:
    """Value of ``ssim_weight * D-SSIM + tv_weight * TV`` over the slices holding ``pixels`` (weighted by
    ``slice_weight`` [M]) and its gradient [p] with respect to ``pred`` [p] (the chosen pixels' predictions)."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    sid = images.sid if pixels is None else images.sid[pixels]
    chosen = torch.zeros(images.n_slices, dtype=torch.bool, device=pred.device)
    chosen[sid] = True
    idx = torch.nonzero(chosen)[:, 0]
    w = slice_weight[idx]
    w = w / w.sum().clamp_min(1e-12)
    with torch.enable_grad():
        p = pred.detach().clone().requires_grad_(True)
        pi = images.images(p, pixels)[idx]
        yi = images.images(y.detach(), pixels)[idx]
        inside = images.inside[idx].float()
        count = inside.sum((1, 2, 3)).clamp_min(1)
        total = p.new_zeros(())
        if ssim_weight > 0:
            _, full = ssim(pi, yi, gaussian_kernel=True, sigma=sigma, kernel_size=window, data_range=data_range,
                           return_full_image=True, reduction="none")
            per_slice = (full * inside).sum((1, 2, 3)) / count
            total = total + ssim_weight * (w * (1.0 - per_slice)).sum()
        if tv_weight > 0:
            both_h = inside[:, :, 1:, :] * inside[:, :, :-1, :]
            both_w = inside[:, :, :, 1:] * inside[:, :, :, :-1]
            tv = ((pi[:, :, 1:, :] - pi[:, :, :-1, :]).abs() * both_h).sum((1, 2, 3)) + \
                ((pi[:, :, :, 1:] - pi[:, :, :, :-1]).abs() * both_w).sum((1, 2, 3))
            pairs = (both_h.sum((1, 2, 3)) + both_w.sum((1, 2, 3))).clamp_min(1)
            total = total + tv_weight * (w * tv / pairs).sum()
        total.backward()
    return float(total.detach()), p.grad


#: Lever arm (mm) turning the mean slice rotation (rad) into a distance for the gauge penalty.
GAUGE_LEVER_MM = 50.0


def anisotropy_penalty(log_scales: Tensor, max_ratio: float) -> Tensor:
    """M-Gaussian's anisotropy regulariser: mean over Gaussians of max(s_max / s_min - max_ratio, 0)."""
    ratio = torch.exp(log_scales.max(-1).values - log_scales.min(-1).values)
    return (ratio - max_ratio).clamp_min(0).mean()


def scale_penalty(log_scales: Tensor, cfg: "LossConfig") -> Tensor:
    """GSVR's scale regulariser: Eq. 7 of the paper (``two_sided``) or its public code's one-sided bound on
    the log scales (``lower``), unweighted."""
    if cfg.scale_reg == "lower":
        return (math.log(cfg.scale_target_mm) - log_scales).clamp_min(0).square().mean()
    return (torch.exp(log_scales) - cfg.scale_target_mm).square().sum(-1).mean()


def motion_penalty(motion: "SliceMotion", cfg: "LossConfig") -> Tensor:
    """GSVR's motion regulariser: ``motion_rotation_weight`` x the mean over slices and axes of q_xyz^2 (q the
    unit quaternion of the rotation vector r: q_xyz = sin(|r| / 2) r / |r|) plus ``motion_translation_weight``
    x the mean of t^2 (mm^2)."""
    theta = (motion.rotvec.square().sum(-1, keepdim=True) + 1e-12).sqrt()
    q_xyz = motion.rotvec * torch.sin(0.5 * theta) / theta
    return cfg.motion_rotation_weight * q_xyz.square().mean() + cfg.motion_translation_weight * motion.trans.square().mean()


def regularise(field: "GaussianField", motion: "SliceMotion", cfg: "LossConfig") -> float:
    """GSVR's scale and motion regularisers, M-Gaussian's anisotropy penalty and a gauge term pinning the
    mean slice motion and scale, back-propagated; returns their value."""
    reg = cfg.scale_reg_weight * scale_penalty(field.log_scales, cfg)
    if cfg.motion_rotation_weight > 0 or cfg.motion_translation_weight > 0:
        reg = reg + motion_penalty(motion, cfg)
    if cfg.anisotropy is not None and cfg.anisotropy.weight > 0:
        reg = reg + cfg.anisotropy.weight * anisotropy_penalty(field.log_scales, cfg.anisotropy.max_ratio)
    gauge = cfg.gauge_weight * (
        motion.trans.mean(0).square().sum()
        + (GAUGE_LEVER_MM * motion.rotvec.mean(0)).square().sum()
        + motion.log_scale.mean().square()
    )
    total = reg + gauge
    total.backward()
    return total.item()
