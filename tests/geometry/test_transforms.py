import numpy as np
import torch
from scipy.spatial.transform import Rotation

from gsvr.geometry import axis_angle_to_matrix, euler_to_matrix, matrix_to_axis_angle, quaternion_to_matrix


def _random_rotvecs(n=64, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, 3))
    v *= (rng.uniform(0, np.pi, n) / np.linalg.norm(v, axis=1))[:, None]
    v[0] = 0.0  # identity
    v[1] = [1e-9, 0, 0]  # near zero
    return v


def test_axis_angle_matches_scipy():
    v = _random_rotvecs()
    ours = axis_angle_to_matrix(torch.tensor(v)).numpy()
    assert np.allclose(ours, Rotation.from_rotvec(v).as_matrix(), atol=1e-12)


def test_matrix_to_axis_angle_round_trip():
    v = _random_rotvecs()[2:]
    back = matrix_to_axis_angle(axis_angle_to_matrix(torch.tensor(v))).numpy()
    assert np.allclose(Rotation.from_rotvec(back).as_matrix(), Rotation.from_rotvec(v).as_matrix(), atol=1e-9)


def test_quaternion_matches_scipy():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(32, 4))  # (w, x, y, z), unnormalised
    ours = quaternion_to_matrix(torch.tensor(q)).numpy()
    ref = Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix()
    assert np.allclose(ours, ref, atol=1e-12)


def test_euler_matches_scipy_extrinsic_xyz():
    rng = np.random.default_rng(2)
    a = rng.uniform(-np.pi, np.pi, size=(32, 3))
    assert np.allclose(euler_to_matrix(torch.tensor(a)).numpy(), Rotation.from_euler("xyz", a).as_matrix(), atol=1e-12)


def test_axis_angle_gradient_is_finite_at_zero():
    v = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    axis_angle_to_matrix(v).sum().backward()
    assert torch.isfinite(v.grad).all()
    assert torch.autograd.gradcheck(axis_angle_to_matrix, (torch.randn(4, 3, dtype=torch.float64, requires_grad=True),))
