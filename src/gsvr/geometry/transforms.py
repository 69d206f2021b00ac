"""Rotation parameterisations as differentiable torch functions.

Conventions: rotation matrices act on column vectors (x' = R x); axis-angle vectors
are in radians; quaternions are (w, x, y, z) and need not be normalised on input.
"""

from __future__ import annotations

import torch
from torch import Tensor


def axis_angle_to_matrix(rotvec: Tensor) -> Tensor:
    """Rodrigues' formula, smooth at zero angle.

    Args:
        rotvec: [..., 3] axis * angle (radians).

    Returns:
        [..., 3, 3] rotation matrices.
    """
    theta2 = (rotvec * rotvec).sum(-1, keepdim=True)  # [..., 1]
    small = theta2 < 1e-8
    theta2_safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta = theta2_safe.sqrt()
    # sin(t)/t and (1-cos(t))/t^2 with Taylor expansions near zero.
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / theta2_safe)
    x, y, z = rotvec.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*rotvec.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device).expand_as(k)
    return eye + a[..., None] * k + b[..., None] * (k @ k)


def matrix_to_axis_angle(matrix: Tensor) -> Tensor:
    """Inverse of :func:`axis_angle_to_matrix` (through quaternions, stable for all angles).

    Args:
        matrix: [..., 3, 3] rotation matrices.

    Returns:
        [..., 3] axis-angle vectors with angle in [0, pi].
    """
    quat = matrix_to_quaternion(matrix)
    quat = torch.where(quat[..., :1] < 0, -quat, quat)
    w = quat[..., 0].clamp(-1.0, 1.0)
    xyz = quat[..., 1:]
    sin_half = xyz.norm(dim=-1)
    angle = 2.0 * torch.atan2(sin_half, w)
    scale = torch.where(sin_half > 1e-8, angle / sin_half.clamp_min(1e-12), 2.0 + angle * angle / 12.0)
    return xyz * scale[..., None]


def matrix_to_quaternion(matrix: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] to unit quaternions [..., 4] (w, x, y, z)."""
    m = matrix
    trace = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    candidates = torch.stack(
        [
            torch.stack([1 + trace, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
            torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2], m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
            torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0], 1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], m[..., 1, 2] + m[..., 2, 1]], -1),
            torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1], 1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]], -1),
        ],
        dim=-2,
    )  # [..., 4, 4]; row i is 4 q_i q
    diag = torch.stack([1 + trace, 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2], 1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], 1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]], -1)
    best = diag.argmax(-1)  # [...]
    row = torch.gather(candidates, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    return row / row.norm(dim=-1, keepdim=True)


def quaternion_to_matrix(quat: Tensor) -> Tensor:
    """Quaternions [..., 4] (w, x, y, z), normalised here, to rotation matrices [..., 3, 3]."""
    q = quat / quat.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*quat.shape[:-1], 3, 3)


def euler_to_matrix(angles: Tensor) -> Tensor:
    """Extrinsic x-y-z Euler angles (radians) [..., 3] to matrices: R = Rz @ Ry @ Rx.

    Matches ``scipy.spatial.transform.Rotation.from_euler("xyz", angles)``.
    """
    ax, ay, az = angles.unbind(-1)
    one, zero = torch.ones_like(ax), torch.zeros_like(ax)
    cx, sx, cy, sy, cz, sz = ax.cos(), ax.sin(), ay.cos(), ay.sin(), az.cos(), az.sin()
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).reshape(*ax.shape, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(*ax.shape, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).reshape(*ax.shape, 3, 3)
    return rz @ ry @ rx
