"""Classical SVR pieces: Gauss-Newton slice-to-volume registration, CG super-resolution, cycles."""

import numpy as np
import pytest
import torch
from helpers import stacks_from_simulation
from scipy import ndimage

from gsvr.geometry import axis_angle_to_matrix
from gsvr.ops.voxel import VoxelGrid
from gsvr.recon.slices import SliceMotion, build_slice_data, set_motion_from_table, transform_points
from gsvr.recon.state import support_radius
from gsvr.recon.svr import (SvrSettings, _grad_penalty_normal, edge_weights, em_robust_weights, register, remove_global_motion,
                            super_resolve, support_mask, svr_cycles, within_radius)
from gsvr.simulate.stacks import SimulationConfig, simulate_stacks

SIM = dict(inplane_spacing_mm=1.6, thickness_mm=4.0, noise_level=0.01, fov_margin_mm=4.0, through_plane_samples=11)


@pytest.fixture(scope="module")
def moved(small_subject):
    vol, mask, affine = small_subject
    sim = simulate_stacks(vol, mask, affine, SimulationConfig(obliquity_deg=5.0, motion_rotation_deg=4.0, motion_translation_mm=3.0, seed=7, **SIM))
    stacks = stacks_from_simulation(sim)
    data = build_slice_data(stacks, quantile=0.99, device=torch.device("cpu"))
    return sim, data, (vol, mask, affine), stacks


def _true_motion(sim, data, stacks) -> SliceMotion:
    """The simulated motions as slice motions."""
    motion = SliceMotion(data.n_slices, torch.device("cpu"))
    set_motion_from_table(data, motion, stacks, sim.motions)
    return motion


def _displacement_mm(data, a: SliceMotion, b: SliceMotion) -> torch.Tensor:
    """Per-slice mean distance between the pixel positions under two motions, common shift removed."""
    with torch.no_grad():
        xa = transform_points(data.x0, data.slice_idx, data.centre, a.rotation(), a.trans)
        xb = transform_points(data.x0, data.slice_idx, data.centre, b.rotation(), b.trans)
    d = xa - xb
    e = (d - d.mean(0)).norm(dim=1)
    return torch.zeros(data.n_slices).index_add(0, data.slice_idx, e) / torch.bincount(data.slice_idx)


def _truth_on_grid(gt, data, spacing_mm):
    vol, _, affine = gt
    grid = VoxelGrid.covering(data.x0, spacing_mm, 8.0)
    pts = grid.points(dtype=torch.float64).reshape(-1, 3).numpy() + data.origin_mm
    ijk = (pts - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    values = ndimage.map_coordinates(vol / data.intensity_scale, ijk.T, order=1).reshape(grid.shape)
    return torch.as_tensor(values, dtype=torch.float32), grid


def test_registration_to_the_true_volume_recovers_slice_motion(moved):
    sim, data, gt, stacks = moved
    truth = _true_motion(sim, data, stacks)
    start = SliceMotion(data.n_slices, torch.device("cpu"))
    before = _displacement_mm(data, start, truth)
    vol, grid = _truth_on_grid(gt, data, 1.6)
    register(vol, grid, data, start, SvrSettings(reg_steps=15))
    after = _displacement_mm(data, start, truth)
    assert before.median() > 2.0, before.median()
    assert after.median() < 0.4, (before.median(), after.median())


def test_super_resolution_with_true_motion_matches_the_ground_truth(moved):
    sim, data, gt, stacks = moved
    truth = _true_motion(sim, data, stacks)
    ref, grid = _truth_on_grid(gt, data, 1.6)
    got = super_resolve(data, truth, torch.ones(data.n_pixels), grid, SvrSettings(cg_iterations=20))
    inside = ndimage.binary_erosion(ref.numpy() > 0.05 * float(ref.max()), iterations=2)
    a, b = got.numpy()[inside], ref.numpy()[inside]
    assert np.corrcoef(a, b)[0, 1] > 0.93


@pytest.fixture(scope="module")
def cycled(moved):
    """Slice displacements from the truth (mm) before the cycles, and after them without and with the last cycle on the
    output grid."""
    sim, data, gt, stacks = moved
    truth = _true_motion(sim, data, stacks)
    after = {}
    for output_registration in (False, True):
        motion = SliceMotion(data.n_slices, torch.device("cpu"))
        settings = SvrSettings(spacings_mm=(3.2, 3.2, 2.4, 2.4, 1.6, 1.6), stack_spacings_mm=(),
                               output_registration=output_registration)
        assert settings.n_cycles(len(stacks)) == 6 + output_registration
        svr_cycles(data, motion, settings, weight_fn=torch.ones_like, output_mm=1.2, radius_mm=support_radius(stacks))
        after[output_registration] = _displacement_mm(data, motion, truth)
    return _displacement_mm(data, SliceMotion(data.n_slices, torch.device("cpu")), truth), after


def test_svr_cycles_recover_motion_from_the_slices_alone(cycled):
    before, after = cycled
    for output_registration, a in after.items():
        assert a.median() < 0.4 * before.median(), (output_registration, before.median(), a.median())


def test_the_last_cycle_on_the_output_grid_brings_the_slices_closer(cycled):
    _, after = cycled
    assert after[True].median() < after[False].median(), (after[True].median(), after[False].median())
    assert SvrSettings(output_registration=True, leave_one_out=False).n_cycles(3) == 6  # leave-one-out only


def test_stack_registration_moves_a_turned_stack_back_as_one_rigid_body(small_subject):
    """A whole stack turned by 28 degrees and shifted 4 mm: registered as one body to the volume of the
    other stacks, every slice lands on its true position, so the slices stay rigid among themselves."""
    vol, mask, affine = small_subject
    sim = simulate_stacks(vol, mask, affine, SimulationConfig(obliquity_deg=5.0, motion_rotation_deg=0.0,
                                                              motion_translation_mm=0.0, seed=7, **SIM))
    stacks = stacks_from_simulation(sim)
    data = build_slice_data(stacks, quantile=0.99, device=torch.device("cpu"))
    stack_of = torch.as_tensor(data.stack_of_slice)
    turned = stack_of == 1
    truth, motion = SliceMotion(data.n_slices, torch.device("cpu")), SliceMotion(data.n_slices, torch.device("cpu"))
    rotvec = torch.tensor([25.0, -12.5, 8.3]) * np.pi / 180
    rot, g = axis_angle_to_matrix(rotvec), data.centre[turned].mean(0)
    with torch.no_grad():
        motion.rotvec[turned] = rotvec
        motion.trans[turned] = (data.centre[turned] - g) @ rot.T + g + torch.tensor([3.0, -2.0, 1.5]) - data.centre[turned]
    before = _displacement_mm(data, motion, truth)[turned]
    s = SvrSettings()
    for spacing in (3.2, 3.2):
        grid = VoxelGrid.covering(transform_points(data.x0, data.slice_idx, data.centre, motion.rotation(),
                                                   motion.trans).detach(), spacing, s.margin_mm)
        volume = super_resolve(data, motion, torch.ones(data.n_pixels), grid, s,
                               pixels=torch.nonzero(~turned[data.slice_idx])[:, 0])
        register(volume, grid, data, motion, s, slices=turned, groups=stack_of)
    after = _displacement_mm(data, motion, truth)
    assert before.mean() > 8.0
    assert after[turned].max() < 0.3, after[turned]
    assert not motion.rotvec[~turned].any() and not motion.trans[~turned].any()  # the other stacks were not chosen


def test_removing_the_global_motion_keeps_relative_motion_and_zeroes_a_common_one(moved):
    _, data, _, _ = moved
    motion = SliceMotion(data.n_slices, torch.device("cpu"))
    rot = axis_angle_to_matrix(torch.tensor([0.1, -0.2, 0.05]))
    shift = torch.tensor([3.0, 1.0, -2.0])
    with torch.no_grad():  # one rigid motion of everything: x = rot x0 + shift
        motion.rotvec[:] = torch.tensor([0.1, -0.2, 0.05])
        motion.trans[:] = shift + data.centre @ rot.T - data.centre
    remove_global_motion(data, motion)
    x = transform_points(data.x0, data.slice_idx, data.centre, motion.rotation(), motion.trans)
    torch.testing.assert_close(x, data.x0, atol=1e-3, rtol=0)
    # Between slices, nothing changes: every pairwise pixel distance survives (one rigid map of all).
    other = _true_motion(moved[0], data, moved[3])
    before = transform_points(data.x0, data.slice_idx, data.centre, other.rotation(), other.trans).detach()
    remove_global_motion(data, other)
    after = transform_points(data.x0, data.slice_idx, data.centre, other.rotation(), other.trans).detach()
    pick = torch.randperm(len(before), generator=torch.Generator().manual_seed(0))[:500]
    a, b = after[pick].double(), before[pick].double()
    torch.testing.assert_close(torch.cdist(a, a), torch.cdist(b, b), atol=2e-3, rtol=0)
    assert (after - data.x0).norm(dim=1).mean() < (before - data.x0).norm(dim=1).mean()


def test_em_robust_weights_single_out_outlier_pixels_and_slices():
    """Kuklisova-Murgasova EM: Gaussian residuals are inliers; a slice whose pixels are mostly off
    (signal void) gets a low slice weight, and its bad pixels low pixel posteriors."""
    gen = torch.Generator().manual_seed(0)
    n_slices, per = 40, 200
    sid = torch.arange(n_slices).repeat_interleave(per)
    res = 0.05 * torch.randn(n_slices * per, generator=gen)
    bad_slices = torch.tensor([3, 17, 30])
    bad = torch.isin(sid, bad_slices) & (torch.rand(n_slices * per, generator=gen) < 0.8)
    res[bad] = -0.8 + 0.1 * torch.randn(int(bad.sum()), generator=gen)
    pixel_w, slice_w = em_robust_weights(res, sid, n_slices)
    good = ~torch.isin(torch.arange(n_slices), bad_slices)
    assert slice_w[bad_slices].max() < 0.1, slice_w
    assert slice_w[good].mean() > 0.95 and slice_w[good].min() > 0.8, slice_w  # clean tail slices keep most weight
    assert pixel_w[bad].max() < 0.01 and pixel_w[~bad].median() > 0.9


def test_edge_weights_are_small_across_an_edge_and_one_on_flat_ground():
    v = torch.zeros(12, 12, 12)
    v[6:] = 1.0  # a step along the first axis
    w = edge_weights(v, spacing_mm=1.0, delta=0.1)
    assert w[0][5].max() < 0.15 and torch.allclose(w[0][:5], torch.ones(1)) and torch.allclose(w[1], torch.ones(1))
    # unit weights give the plain gradient penalty
    x = torch.randn(12, 12, 12)
    assert torch.allclose(_grad_penalty_normal(x, [torch.ones_like(d) for d in edge_weights(x, 1.0, 1.0)]),
                          _grad_penalty_normal(x))


def test_the_edge_prior_fits_the_truth_better_than_tikhonov_at_the_same_penalty(moved):
    """True motion, same (strong) penalty weight: the edge-preserving solve smooths less across tissue
    boundaries, so it correlates better with the ground truth."""
    sim, data, gt, stacks = moved
    truth = _true_motion(sim, data, stacks)
    ref, grid = _truth_on_grid(gt, data, 1.6)
    inside = ndimage.binary_erosion(ref.numpy() > 0.05 * float(ref.max()), iterations=2)
    corr = {}
    for prior in ("tikhonov", "edge"):
        got = super_resolve(data, truth, torch.ones(data.n_pixels), grid, SvrSettings(cg_iterations=20, tikhonov=0.5, prior=prior))
        corr[prior] = np.corrcoef(got.numpy()[inside], ref.numpy()[inside])[0, 1]
    assert corr["edge"] > corr["tikhonov"] + 0.005, corr


def test_a_slice_whose_intensity_scale_hits_the_clamp_loses_its_weight_and_ordinary_spread_does_not():
    from gsvr.recon.svr import scale_outlier_weights

    log_scale = torch.log(torch.tensor([1.0, 0.97, 1.03, 1.05, 0.95, 1.01, 0.99, 2.0, 0.5]))
    w = scale_outlier_weights(log_scale, 4.0)
    assert (w[:7] > 0.9).all() and (w[7:] < 0.05).all(), w


def test_a_slice_whose_registration_fits_worse_than_the_others_loses_its_weight_and_a_better_fit_does_not():
    from gsvr.recon.svr import ncc_outlier_weights

    ncc = torch.tensor([0.988, 0.985, 0.990, 0.992, 0.987, 0.989, 0.999, 0.96, -0.6])
    w = ncc_outlier_weights(ncc, 2.0)
    assert (w[:7] > 0.9).all() and (w[7:] < 0.2).all(), w


def test_scale_outlier_setting_is_checked_and_can_be_switched_off():
    from gsvr.errors import GsvrError
    from gsvr.recon.config import ReconConfig

    assert ReconConfig.from_dict({"svr": {"scale_outlier_z": None}}).svr.scale_outlier_z is None
    for bad in (0, -1.0, float("nan")):
        for name in ("scale_outlier_z", "ncc_outlier_z"):
            with pytest.raises(GsvrError, match=name):
                ReconConfig.from_dict({"svr": {name: bad}})


def test_the_held_out_pixels_are_a_fixed_spread_fraction():
    from gsvr.recon.svr import holdout_pixels

    held = holdout_pixels(100_000, 0.1)
    assert torch.equal(held, holdout_pixels(100_000, 0.1))  # the same split in every run
    assert abs(float(held.float().mean()) - 0.1) < 0.005
    assert 0.07 < float(held[:1000].float().mean()) < 0.13  # spread: every stretch of pixels has its share
    assert not holdout_pixels(1000, 0.0).any() and holdout_pixels(1000, 1.0).all()


@pytest.mark.parametrize("noise, expected", [(0.0, 0.25), (0.5, 16.0)])
def test_the_held_out_error_chooses_weak_smoothing_for_clean_slices_and_strong_for_noisy_ones(moved, noise, expected):
    """Clean slices: the least regularised solve predicts unseen pixels best. Slices drowned in noise (std 0.5 of
    the normalised intensity): a weakly regularised solve fits the noise of the training pixels (overfitting,
    forced), and the held-out error picks the strongest smoothing. Either way the choice is the factor whose
    solve from *all* pixels is closest to the ground truth."""
    import dataclasses

    from gsvr.recon.svr import select_tikhonov

    sim, data, gt, stacks = moved
    truth = _true_motion(sim, data, stacks)
    gen = torch.Generator().manual_seed(0)
    noisy = dataclasses.replace(data, y=data.y + noise * torch.randn(data.y.shape, generator=gen))
    ref, grid = _truth_on_grid(gt, data, 1.6)
    s = SvrSettings(cg_iterations=20, tikhonov=0.05)
    factors = [16.0, 1.0, 0.25]
    lam, start, errors = select_tikhonov(noisy, truth, torch.ones(data.n_pixels), grid, s, factors)
    assert lam == pytest.approx(0.05 * expected) and [f for f, _ in errors] == factors and start.shape == grid.shape
    inside = ndimage.binary_erosion(ref.numpy() > 0.05 * float(ref.max()), iterations=2)
    rmse = {f: float(np.sqrt(np.mean((super_resolve(noisy, truth, torch.ones(data.n_pixels), grid,
                                                   dataclasses.replace(s, tikhonov=0.05 * f)).numpy() - ref.numpy())[inside] ** 2)))
            for f in factors}
    assert min(rmse, key=rmse.get) == expected, rmse


def test_a_solve_from_some_pixels_is_the_solve_from_all_with_the_others_weighted_zero(moved):
    """What select_tikhonov relies on to share one acquisition matrix: the operator of the chosen pixels, or that of all
    pixels with the others weighted zero, give the same volume (the same normal equations, penalty scaled alike)."""
    from gsvr.recon.svr import SliceOperator, holdout_pixels

    sim, data, _, stacks = moved
    truth = _true_motion(sim, data, stacks)
    grid = VoxelGrid.covering(data.x0, 1.6, 6.0)
    s = SvrSettings(cg_iterations=8, tikhonov=0.05)
    held = holdout_pixels(data.n_pixels, 0.3)
    weight = torch.rand(data.n_pixels, generator=torch.Generator().manual_seed(2)) + 0.5
    some = super_resolve(data, truth, weight, grid, s, pixels=torch.nonzero(~held)[:, 0])
    every = SliceOperator(data, truth, grid, s, torch.arange(data.n_pixels), matrix=True)
    zeroed = super_resolve(data, truth, torch.where(held, 0.0, weight), grid, s, operator=every)
    assert float(some.abs().max()) > 0.1
    torch.testing.assert_close(zeroed, some, rtol=1e-4, atol=1e-5 * float(some.abs().max()))
    all_pixels = super_resolve(data, truth, weight, grid, s, operator=every)
    assert not torch.allclose(all_pixels, some, atol=1e-3 * float(some.abs().max()))  # the held-out pixels do count


@pytest.mark.parametrize("spacing, radius", [(0.8, 2.0), (1.3, 0.5), (0.5, 3.1)])
def test_support_mask_is_the_brute_force_radius_test(spacing, radius):
    """The distance-transform shortcut decides every voxel as the nearest-neighbour test of all of them does: points on
    slabs (like slices) and scattered, a radius under and over the spacing, and points off the grid (the fallback)."""
    gen = torch.Generator().manual_seed(3)
    slab = torch.rand(4000, 3, generator=gen) * torch.tensor([30.0, 25.0, 0.0]) + torch.tensor([0.0, 0.0, 7.3])
    points = torch.cat([slab, slab[:, [2, 0, 1]] * 0.9, torch.rand(300, 3, generator=gen) * 30.0])
    grid = VoxelGrid.covering(points, spacing, radius)
    brute = within_radius(points, grid.points().reshape(-1, 3), radius).reshape(grid.shape)
    got = support_mask(grid, points, radius)
    assert 0 < int(brute.sum()) < brute.numel() and torch.equal(got, brute)
    shifted = VoxelGrid(tuple(c + 5.0 for c in grid.corner_mm), spacing, grid.shape)  # some points off this grid
    assert torch.equal(support_mask(shifted, points, radius),
                       within_radius(points, shifted.points().reshape(-1, 3), radius).reshape(grid.shape))
