"""Slice-to-volume registration by damped Gauss-Newton on each slice's NCC (batched over slices).

Used by the SVR cycles (:func:`gsvr.recon.svr.svr_cycles`) and by the slice-level assessment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gsvr.geometry import axis_angle_to_matrix, matrix_to_axis_angle
from gsvr.ops.voxel import VoxelGrid, psf_nodes, psf_offsets
from gsvr.recon.slices import SliceData, SliceMotion

if TYPE_CHECKING:
    from gsvr.recon.config import SvrSettings


def register(volume: Tensor, grid: VoxelGrid, data: SliceData, motion: SliceMotion, s: SvrSettings, *,
             slices: Tensor | None = None, rotate: bool = True, groups: Tensor | None = None) -> Tensor:
    """Slice-to-volume registration of all (or the ``slices`` [M] bool) slices by damped Gauss-Newton; returns NCC [M].

    With ``groups`` [M] (int, e.g. the stack of each slice) every group moves as one rigid body about
    its centre (stack-to-volume registration): the slices' normal equations are summed with the
    rotation's lever arm taken from the group centre, and no motion prior applies.

    Each slice is fitted as y = a * A_i(V) + b (a, b per slice by least squares, i.e. NCC), the
    residual linearised in a small rotation about the slice's current centre and a translation:
    d q / d omega = -[q - c - t]_x, d q / d t = I for every PSF node q. The volume gradient at
    the nodes comes from a central-difference gradient volume sampled with the values. The
    6x6 normal equations of every slice are solved in one batched call (Levenberg-Marquardt
    damping); steps are capped so one iteration moves a slice by at most ``max_step``.
    """
    dev = data.x0.device
    nodes, node_w = psf_nodes(s.psf_normal, s.psf_inplane, dev)
    channels = torch.cat([volume[None], _central_gradient(volume, grid.spacing_mm)])[None]  # [1, 4, I, J, K]
    m, sid = data.n_slices, data.slice_idx
    if slices is None:
        slices = torch.ones(m, dtype=torch.bool, device=dev)
    pixels = torch.nonzero(slices[sid])[:, 0]
    rotation = motion.rotation().detach()
    trans = motion.trans.detach().clone()
    ncc = torch.zeros(m, device=dev)
    if groups is not None:
        groups = torch.unique(groups, return_inverse=True)[1]
        n_groups = int(groups.max()) + 1
    for it in range(s.reg_steps + 1):
        if groups is not None:  # rotation about each group's centre: the mean centre of its slices
            centres = data.centre + trans
            group_centre = torch.zeros(n_groups, 3, device=dev).index_add(0, groups, centres)
            group_centre = group_centre / torch.bincount(groups, minlength=n_groups).clamp_min(1)[:, None]
            lever = centres - group_centre[groups]  # [M, 3]
        sums = torch.zeros(m, 6, 6, device=dev), torch.zeros(m, 6, device=dev)
        stats = torch.zeros(m, 5, device=dev)  # sum pred, sum y, sum pred^2, sum y^2, sum pred*y
        jac_parts = []
        for start in range(0, len(pixels), s.chunk_pixels):
            c = pixels[start : start + s.chunk_pixels]
            pred, jac = _sample_with_jacobian(channels, grid, data, c, rotation, trans, nodes, node_w)
            y = data.y[c]
            stats.index_add_(0, sid[c], torch.stack([pred, y, pred * pred, y * y, pred * y], -1))
            jac_parts.append((c, pred, jac))
        n = torch.bincount(sid, minlength=m).float().clamp_min(1)[:, None]
        mp, my, mpp, myy, mpy = (stats / n).unbind(-1)
        var_p = (mpp - mp * mp).clamp_min(1e-12)
        cov = mpy - mp * my
        ncc = cov / (var_p * (myy - my * my).clamp_min(1e-12)).sqrt()
        if it == s.reg_steps:
            break
        a = cov / var_p  # y ~ a pred + b
        b = my - a * mp
        sq = torch.zeros(m, device=dev)
        for c, pred, jac in jac_parts:
            si = sid[c]
            r = a[si] * pred + b[si] - data.y[c]
            if groups is not None:  # lever arm from the group centre: u + d for d = slice centre - group centre
                jac = torch.cat([jac[:, :3] + torch.linalg.cross(lever[si], jac[:, 3:]), jac[:, 3:]], -1)
            ja = a[si, None] * jac  # [p, 6]
            sums[0].index_add_(0, si, ja[:, :, None] * ja[:, None, :])
            sums[1].index_add_(0, si, ja * r[:, None])
            sq.index_add_(0, si, r.square())
        # MAP: residuals / sigma^2 (sigma^2 = median over slices of the mean squared residual) plus a
        # zero-mean Gaussian prior on the total motion, which holds slices with little content in place.
        sigma2 = (sq / n[:, 0])[slices].median().clamp_min(1e-8)
        if groups is None:
            prior = torch.tensor([s.prior_rotation_rad ** -2] * 3 + [s.prior_translation_mm ** -2] * 3, device=dev)
            current = torch.cat([matrix_to_axis_angle(rotation), trans], -1)
            hess = sums[0] / sigma2 + torch.diag_embed(prior.expand(m, 6))
            grad = sums[1] / sigma2 + prior * current
        else:
            hess = torch.zeros(n_groups, 6, 6, device=dev).index_add(0, groups, sums[0] * slices[:, None, None]) / sigma2
            grad = torch.zeros(n_groups, 6, device=dev).index_add(0, groups, sums[1] * slices[:, None]) / sigma2
            hess = hess + 1e-6 * torch.eye(6, device=dev)  # groups without chosen slices: a zero step
        diag = torch.diagonal(hess, dim1=-2, dim2=-1)
        damped = hess + torch.diag_embed(s.lm_damping * diag)
        if not rotate:  # translation only: solve the 3x3 translation block
            damped, grad = damped[:, 3:, 3:], grad[:, 3:]
        step = -torch.linalg.solve(damped, grad[:, :, None])[:, :, 0]
        if groups is None:
            step = step * slices[:, None]
        if not rotate:
            step = torch.cat([torch.zeros_like(step), step], -1)
        # Cap the step: rotation (rad) and translation (mm) separately.
        rot_step, t_step = step[:, :3], step[:, 3:]
        rot_step = rot_step * (s.max_step_rad / rot_step.norm(dim=1, keepdim=True).clamp_min(s.max_step_rad))
        t_step = t_step * (s.max_step_mm / t_step.norm(dim=1, keepdim=True).clamp_min(s.max_step_mm))
        if groups is not None:  # each slice of a group: x -> R_d (x - g) + g + t_d, i.e. its centre moves likewise
            r_d = axis_angle_to_matrix(rot_step)[groups] * slices[:, None, None] + \
                torch.eye(3, device=dev) * ~slices[:, None, None]
            t_step = (r_d @ lever[:, :, None])[:, :, 0] - lever + t_step[groups] * slices[:, None]
            rotation = r_d @ rotation
        else:
            rotation = axis_angle_to_matrix(rot_step) @ rotation
        trans = trans + t_step
    with torch.no_grad():
        motion.rotvec.copy_(matrix_to_axis_angle(rotation))
        motion.trans.copy_(trans)
    return ncc


def _central_gradient(volume: Tensor, spacing_mm: float) -> Tensor:
    """[3, I, J, K] spatial gradient (per mm) along the grid axes by central differences."""
    grads = torch.gradient(volume, spacing=spacing_mm)
    return torch.stack(grads)


def _sample_with_jacobian(channels: Tensor, grid: VoxelGrid, data: SliceData, c: Tensor, rotation: Tensor,
                          trans: Tensor, nodes: Tensor, node_w: Tensor) -> tuple[Tensor, Tensor]:
    """Simulated pixel values [p] and their derivatives [p, 6] w.r.t. (small rotation, translation)."""
    sid = data.slice_idx[c]
    rot = rotation[sid]
    centre = data.centre[sid] + trans[sid]  # current slice centre
    x = (rot @ (data.x0[c] - data.centre[sid])[:, :, None])[:, :, 0] + centre
    off = psf_offsets(rotation @ data.axes, data.psf_sigma, nodes)[sid]  # [p, S, 3]
    q = x[:, None, :] + off
    samp = torch.nn.functional.grid_sample(channels, grid.normalised(q)[None, :, :, None, :], mode="bilinear",
                                           padding_mode="zeros", align_corners=True)[0, :, :, :, 0]  # [4, p, S]
    pred = (samp[0] * node_w).sum(-1)
    g = samp[1:].permute(1, 2, 0)  # [p, S, 3]
    u = q - centre[:, None, :]
    j_rot = (torch.linalg.cross(u, g) * node_w[:, None]).sum(1)
    j_t = (g * node_w[:, None]).sum(1)
    return pred, torch.cat([j_rot, j_t], -1)


def slice_ncc(pred: Tensor, y: Tensor, sid: Tensor, m: int) -> Tensor:
    """Normalised cross-correlation of each slice's pixels: [P] x [P] -> [M]."""
    n = torch.bincount(sid, minlength=m).float().clamp_min(1)

    def mean(v: Tensor) -> Tensor:
        return torch.zeros(m, device=v.device).index_add(0, sid, v) / n

    pc = pred - mean(pred)[sid]
    yc = y - mean(y)[sid]
    cov = mean(pc * yc)
    return cov / (mean(pc * pc) * mean(yc * yc)).clamp_min(1e-12).sqrt()
