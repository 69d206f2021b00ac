"""Slices: per-slice rigid motion, gathering the in-mask pixels of stacks, in-plane downsampling."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from torch.testing import assert_close

from gsvr.errors import GsvrError
from gsvr.io.nifti import Stack
from gsvr.ops.psf import psf_sigmas_mm
from gsvr.recon.slices import (SliceMotion, build_slice_data, downsample_inplane, motion_about_centres, slice_axes,
                               transform_points)

CPU = torch.device("cpu")


def _world(affine, ijk):
    return np.asarray(ijk, float) @ affine[:3, :3].T + affine[:3, 3]


def _points(n_slices=3, per_slice=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n_slices * per_slice, 3, generator=g, dtype=torch.float64) * 10
    sid = torch.arange(n_slices).repeat_interleave(per_slice)
    centre = torch.randn(n_slices, 3, generator=g, dtype=torch.float64) * 5
    return x0, sid, centre


def test_zero_motion_leaves_the_points_where_they_are():
    x0, sid, centre = _points()
    x0, centre = x0.float(), centre.float()
    motion = SliceMotion(3, CPU)
    assert torch.equal(motion.rotation(), torch.eye(3).expand(3, 3, 3))
    assert_close(transform_points(x0, sid, centre, motion.rotation(), motion.trans), x0, rtol=0, atol=1e-5)


def test_a_rotation_turns_each_slice_about_its_own_centre_then_shifts_it():
    from gsvr.geometry import axis_angle_to_matrix

    x0, sid, centre = _points()
    rotvec = torch.tensor([[0.3, -0.2, 0.5], [0.0, 0.0, 0.0], [-1.1, 0.4, 2.0]], dtype=torch.float64)
    trans = torch.tensor([[1.0, 2.0, -3.0], [0.5, 0.0, 0.0], [0.0, -4.0, 1.5]], dtype=torch.float64)
    got = transform_points(x0, sid, centre, axis_angle_to_matrix(rotvec), trans)
    r = Rotation.from_rotvec(rotvec.numpy()[sid.numpy()])
    c = centre.numpy()[sid.numpy()]
    expected = r.apply(x0.numpy() - c) + c + trans.numpy()[sid.numpy()]
    assert_close(got, torch.as_tensor(expected), rtol=1e-12, atol=1e-10)
    # A slice's centre only moves by its translation.
    at_centres = transform_points(centre, torch.arange(3), centre, axis_angle_to_matrix(rotvec), trans)
    assert_close(at_centres, centre + trans, rtol=1e-12, atol=1e-10)


def test_slice_motion_rotation_matches_scipy_rotvec_including_tiny_and_large_angles():
    rotvec = np.array([[0.2, -0.4, 0.1], [1e-5, -2e-5, 3e-6], [0.0, 0.0, 0.0], [2.0, 1.5, -1.2], [0.0, 3.1, 0.0]])
    motion = SliceMotion(len(rotvec), CPU)
    with torch.no_grad():
        motion.rotvec.copy_(torch.as_tensor(rotvec))
    got = motion.rotation()
    assert got.shape == (5, 3, 3) and got.dtype == torch.float32
    assert_close(got, torch.as_tensor(Rotation.from_rotvec(rotvec).as_matrix(), dtype=torch.float32), rtol=0, atol=2e-6)
    # Slice motions start at rest and are trainable.
    assert {n for n, p in SliceMotion(2, CPU).named_parameters() if p.requires_grad} == {"rotvec", "trans", "log_scale"}


def test_motion_about_other_centres_is_the_same_rigid_map_and_round_trips():
    g = torch.Generator().manual_seed(3)
    motion = SliceMotion(4, CPU)
    with torch.no_grad():
        motion.rotvec.copy_(torch.randn(4, 3, generator=g) * 0.4)
        motion.trans.copy_(torch.randn(4, 3, generator=g) * 3)
        motion.log_scale.copy_(torch.randn(4, generator=g) * 0.1)
    centre = torch.randn(4, 3, generator=g) * 20
    rows = torch.tensor([2, 0])
    new_centre = torch.randn(2, 3, generator=g) * 20
    rotvec, trans, log_scale = motion_about_centres(motion, centre, new_centre, rows)
    assert torch.equal(rotvec, motion.rotvec[rows]) and torch.equal(log_scale, motion.log_scale[rows])
    assert not trans.requires_grad
    # The same map x -> R (x - c) + c + t, whichever centre it is written about.
    pts = torch.randn(50, 3, generator=g) * 20
    sid = torch.arange(2).repeat(25)
    rot = motion.rotation()[rows].detach()
    about_old = transform_points(pts, sid, centre[rows], rot, motion.trans[rows].detach())
    about_new = transform_points(pts, sid, new_centre, rot, trans)
    assert_close(about_new, about_old, rtol=0, atol=1e-4)
    # Back about the old centres: the original translations.
    moved = SliceMotion(2, CPU)
    with torch.no_grad():
        moved.rotvec.copy_(rotvec)
        moved.trans.copy_(trans)
        moved.log_scale.copy_(log_scale)
    _, back, _ = motion_about_centres(moved, new_centre, centre[rows], torch.arange(2))
    assert_close(back, motion.trans[rows].detach(), rtol=0, atol=1e-4)


def _tiny_stacks():
    """Stack a: axis-aligned (2 x 1.5 x 4 mm), 3 pixels in slice 0, none in slice 1, 2 in slice 2.
    Stack b: oblique (1 x 1 x 3 mm), 2 pixels in its slice 1 only."""
    aff_a = np.diag([2.0, 1.5, 4.0, 1.0])
    aff_a[:3, 3] = [10.0, -5.0, 3.0]
    data_a = np.arange(1, 37, dtype=np.float32).reshape(4, 3, 3)
    mask_a = np.zeros((4, 3, 3), bool)
    mask_a[[0, 1, 3], [0, 2, 1], 0] = True
    mask_a[[2, 2], [0, 1], 2] = True
    rot = Rotation.from_rotvec([0.2, -0.3, 0.4]).as_matrix()
    aff_b = np.eye(4)
    aff_b[:3, :3] = rot * [1.0, 1.0, 3.0]
    aff_b[:3, 3] = [-2.0, 4.0, 1.0]
    data_b = np.full((2, 2, 2), 50.0, np.float32)
    data_b[1, 1, 1] = 20.0
    mask_b = np.zeros((2, 2, 2), bool)
    mask_b[[0, 1], [0, 1], 1] = True
    return (Stack(data=data_a, mask=mask_a, affine=aff_a, thickness_mm=4.0, name="a"),
            Stack(data=data_b, mask=mask_b, affine=aff_b, thickness_mm=3.0, name="b"), rot)


def test_build_slice_data_gathers_the_in_mask_pixels_of_non_empty_slices():
    a, b, rot = _tiny_stacks()
    data = build_slice_data([a, b], quantile=1.0, device=CPU)
    assert (data.n_pixels, data.n_slices) == (7, 3)  # stack a's empty slice 1 is dropped
    assert data.stack_of_slice.tolist() == [0, 0, 1] and data.slice_in_stack.tolist() == [0, 2, 1]
    assert data.stack_names == ["a", "b"]
    assert data.slice_idx.tolist() == [0, 0, 0, 1, 1, 2, 2]
    # Pixels in np.argwhere order within each slice; intensities divided by the quantile (here the maximum, 50).
    ijk_a0, ijk_a2, ijk_b1 = [[0, 0, 0], [1, 2, 0], [3, 1, 0]], [[2, 0, 2], [2, 1, 2]], [[0, 0, 1], [1, 1, 1]]
    assert data.intensity_scale == 50.0
    values = [a.data[tuple(v)] for v in ijk_a0 + ijk_a2] + [b.data[tuple(v)] for v in ijk_b1]
    assert_close(data.y, torch.tensor(values) / 50.0)
    world = np.concatenate([_world(a.affine, ijk_a0), _world(a.affine, ijk_a2), _world(b.affine, ijk_b1)])
    assert np.allclose(data.origin_mm, world.mean(0))
    assert_close(data.x0, torch.as_tensor(world - data.origin_mm, dtype=torch.float32), rtol=0, atol=1e-5)
    centres = np.stack([world[:3].mean(0), world[3:5].mean(0), world[5:].mean(0)]) - data.origin_mm
    assert_close(data.centre, torch.as_tensor(centres, dtype=torch.float32), rtol=0, atol=1e-5)
    assert data.pixel_ij.tolist() == [[0, 0], [1, 2], [3, 1], [0, 0], [0, 1], [0, 0], [1, 1]]  # from each slice's bbox corner
    # Slice frames and PSFs follow each stack's header.
    assert_close(data.axes, torch.as_tensor(np.stack([np.eye(3), np.eye(3), rot]), dtype=torch.float32), rtol=0, atol=1e-6)
    sig = [psf_sigmas_mm((2.0, 1.5), 4.0)] * 2 + [psf_sigmas_mm((1.0, 1.0), 3.0)]
    assert_close(data.psf_sigma, torch.tensor(sig, dtype=torch.float32))
    # Half a pixel's footprint (half spacing in plane, half slice spacing through plane) along world axes.
    assert_close(data.jitter_mm[0], torch.tensor([1.0, 0.75, 2.0]))
    assert data.grad_mag.shape == (7,) and (data.grad_mag >= 0).all()


def test_build_slice_data_like_another_shares_its_frame_and_units():
    a, b, _ = _tiny_stacks()
    both = build_slice_data([a, b], quantile=1.0, device=CPU)
    only_b = build_slice_data([b], quantile=1.0, device=CPU, like=both)
    assert only_b.intensity_scale == both.intensity_scale and np.array_equal(only_b.origin_mm, both.origin_mm)
    assert_close(only_b.x0, both.x0[5:])
    assert_close(only_b.y, both.y[5:])
    alone = build_slice_data([b], quantile=1.0, device=CPU)
    assert alone.intensity_scale == 50.0 and not np.allclose(alone.origin_mm, both.origin_mm)


def test_build_slice_data_refuses_stacks_empty_inside_their_masks():
    a, _, _ = _tiny_stacks()
    empty = Stack(data=np.zeros_like(a.data), mask=a.mask, affine=a.affine, thickness_mm=4.0, name="empty")
    with pytest.raises(GsvrError, match="empty: the 0.99 quantile"):
        build_slice_data([empty], quantile=0.99, device=CPU)


def test_slice_axes_are_the_orthonormal_in_plane_axes_and_normal():
    shear = np.eye(4)
    shear[:3, :3] = [[2.0, 0.5, 0.0], [0.0, 1.5, 0.0], [0.0, 0.0, 3.0]]  # in-plane y not orthogonal to x
    ax = slice_axes(shear)
    assert np.allclose(ax.T @ ax, np.eye(3)) and np.isclose(np.linalg.det(ax), 1.0)
    assert np.allclose(ax[:, 0], [1, 0, 0]) and np.allclose(ax[:, 2], [0, 0, 1])


def test_downsample_inplane_averages_blocks_and_doubles_the_in_plane_spacing():
    rng = np.random.default_rng(0)
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_rotvec([0.1, 0.2, -0.3]).as_matrix() * [0.8, 0.9, 3.0]
    affine[:3, 3] = [5.0, -7.0, 2.0]
    data = rng.random((7, 5, 2)).astype(np.float32)  # odd sizes: the last row and column are cut
    mask = np.zeros((7, 5, 2), bool)
    mask[0:2, 0:2, 0] = [[True, True], [True, False]]  # 3 of 4: in the mask
    mask[2:4, 0:2, 0] = [[True, False], [True, False]]  # 2 of 4: not
    stack = Stack(data=data, mask=mask, affine=affine, thickness_mm=3.5, name="fine")
    coarse = downsample_inplane(stack)
    assert coarse.data.shape == (3, 2, 2) and coarse.mask.shape == (3, 2, 2)
    assert np.allclose(coarse.spacing_mm, [1.6, 1.8, 3.0])
    assert (coarse.thickness_mm, coarse.name, coarse.n_slices) == (3.5, "fine", 2)
    assert np.allclose(coarse.data, data[:6, :4].reshape(3, 2, 2, 2, 2).mean((1, 3)))
    assert coarse.mask[0, 0, 0] and not coarse.mask[1, 0, 0] and coarse.mask.sum() == 1
    # Each coarse voxel sits at the centre of its block of fine voxels.
    for i, j, k in [(0, 0, 0), (2, 1, 1), (1, 0, 1)]:
        block = _world(affine, [[2 * i + di, 2 * j + dj, k] for di in (0, 1) for dj in (0, 1)]).mean(0)
        assert np.allclose(_world(coarse.affine, [[i, j, k]])[0], block)
    with pytest.raises(GsvrError, match="too small"):
        downsample_inplane(Stack(data=data[:1], mask=mask[:1], affine=affine, thickness_mm=3.5, name="thin"))
