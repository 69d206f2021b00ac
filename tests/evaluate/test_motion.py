"""The per-slice motion error on hand-built cases with known answers, and the slice-table round trip."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import stacks_from_simulation
from scipy.spatial.transform import Rotation

from gsvr.evaluate.motion import motion_errors, slice_points, summarise
from gsvr.recon.slices import SliceMotion, build_slice_data, header_motion, set_motion_from_table
from gsvr.recon.state import slice_table
from gsvr.simulate.stacks import SimulationConfig, simulate_stacks

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def simulated(small_subject):
    vol, mask, affine = small_subject
    sim = simulate_stacks(vol, mask, affine, SimulationConfig(inplane_spacing_mm=1.6, thickness_mm=4.0, obliquity_deg=5.0,
                                                              noise_level=0.0, fov_margin_mm=4.0, through_plane_samples=5,
                                                              seed=7))
    return sim, stacks_from_simulation(sim)


def _table(rotvecs_deg, centres, trans, weights=None):
    n = len(rotvecs_deg)
    t = pd.DataFrame({"stack_index": np.zeros(n, int), "slice_index": np.arange(n)})
    for j, a in enumerate("xyz"):
        t[f"r{a}_deg"], t[f"c{a}_mm"], t[f"t{a}_mm"] = rotvecs_deg[:, j], centres[:, j], trans[:, j]
    if weights is not None:
        t["weight"] = weights
    return t


def _points(n):
    """A 20 x 20 mm square of pixels per slice, slices 3 mm apart along z."""
    g = np.stack(np.meshgrid(np.arange(-10, 11, 2.0), np.arange(-10, 11, 2.0), indexing="ij"), -1).reshape(-1, 2)
    return {(0, k): np.concatenate([g, np.full((len(g), 1), 3.0 * k)], 1) for k in range(n)}


def test_a_common_pose_is_not_an_error_and_a_bad_slice_shows_its_exact_error():
    n = 20
    true_rv = RNG.uniform(-6, 6, (n, 3))
    centre = np.zeros((n, 3))
    true = _table(true_rv, centre, RNG.uniform(-4, 4, (n, 3)))
    # The estimate: the truth seen through a global pose G (20 deg about z, shifted), and slice 7 off by
    # a further 10 deg about its own centre (x = 0) and 3 mm along x.
    g = Rotation.from_euler("z", 20, degrees=True)
    est_rv, est_c, est_t = [], [], []
    for k, row in true.iterrows():
        r = Rotation.from_rotvec(np.radians(row[["rx_deg", "ry_deg", "rz_deg"]].to_numpy(float)))
        t = row[["tx_mm", "ty_mm", "tz_mm"]].to_numpy(float)
        extra_r, extra_t = (Rotation.from_euler("x", 10, degrees=True), np.array([3.0, 0, 0])) if k == 7 else (Rotation.identity(), 0)
        # est(x) = G^-1 (E (true(x)) ) with E the extra motion about the origin; written about centre 0.
        rot = g.inv() * extra_r * r
        est_rv.append(np.degrees(rot.as_rotvec()))
        est_c.append(np.zeros(3))
        est_t.append(g.inv().apply(extra_r.apply(t) + extra_t - [5.0, -2.0, 1.0]))
    weights = np.full(n, 0.9)
    weights[7] = 0.1
    est = _table(np.array(est_rv), np.array(est_c), np.array(est_t), weights)
    err = motion_errors(est, true, _points(n)).set_index("slice_index")
    good = err.drop(index=7)
    assert good["rotation_error_deg"].max() < 1e-6 and good["displacement_mm"].max() < 1e-6
    assert abs(err.loc[7, "rotation_error_deg"] - 10.0) < 1e-6
    # Slice 7's pixels: E moves true(x) by a 10 deg turn about the origin and 3 mm; the mean distance is known.
    moved = [(Rotation.from_rotvec(np.radians(true_rv[7])).apply(p) + true.loc[7, ["tx_mm", "ty_mm", "tz_mm"]].to_numpy(float))
             for p in [_points(n)[(0, 7)]]][0]
    expected = np.linalg.norm(Rotation.from_euler("x", 10, degrees=True).apply(moved) + [3.0, 0, 0] - moved, axis=1).mean()
    assert abs(err.loc[7, "displacement_mm"] - expected) < 1e-6
    s = summarise(err.reset_index())
    assert s["n_bad"] == 1 and s["bad_max_weight"] == 0.1 and abs(s["rot_max"] - 10) < 1e-6


def test_slice_table_round_trip_through_the_input_header_including_stack_alignment(simulated):
    sim, small_stacks = simulated
    stacks = list(small_stacks)
    turn = np.eye(4)
    turn[:3, :3] = Rotation.from_euler("xyz", [10, -5, 20], degrees=True).as_matrix()
    turn[:3, 3] = [2.0, -1.0, 3.0]
    stacks[1] = dataclasses.replace(stacks[1], affine=turn @ stacks[1].affine, alignment=turn)
    data = build_slice_data(stacks, quantile=0.99, device=torch.device("cpu"))
    motion = SliceMotion(data.n_slices, torch.device("cpu"))
    with torch.no_grad():
        motion.rotvec.copy_(torch.from_numpy(RNG.uniform(-0.1, 0.1, (data.n_slices, 3))).float())
        motion.trans.copy_(torch.from_numpy(RNG.uniform(-3, 3, (data.n_slices, 3))).float())
    table = slice_table(data, motion, torch.ones(data.n_slices), stacks)
    # The table maps input-header positions to where the reconstruction puts them.
    rot, centre, trans = header_motion(data, motion, stacks)
    s1 = stacks[1]
    k = int(np.nonzero(data.stack_of_slice == 1)[0][0])
    z = int(data.slice_in_stack[k])
    ij = np.argwhere(s1.mask[:, :, z])[:5]
    ijk = np.concatenate([ij, np.full((len(ij), 1), z)], 1).astype(float)
    input_world = ijk @ small_stacks[1].affine[:3, :3].T + small_stacks[1].affine[:3, 3]
    aligned_rel = ijk @ s1.affine[:3, :3].T + s1.affine[:3, 3] - data.origin_mm
    with torch.no_grad():
        r = motion.rotation()[k].double().numpy()
        c = data.centre[k].double().numpy()
        expected = (aligned_rel - c) @ r.T + c + motion.trans[k].double().numpy() + data.origin_mm
    assert np.allclose((input_world - centre[k]) @ rot[k].T + centre[k] + trans[k], expected, atol=1e-3)
    # And back: a fresh motion set from the table equals the original.
    again = SliceMotion(data.n_slices, torch.device("cpu"))
    set_motion_from_table(data, again, stacks, table.sample(frac=1.0, random_state=1))  # row order does not matter
    assert torch.allclose(again.rotvec, motion.rotvec, atol=1e-5) and torch.allclose(again.trans, motion.trans, atol=1e-3)


def test_the_true_motions_of_a_simulation_score_zero_error_and_the_headers_do_not(simulated):
    sim, stacks = simulated
    data = build_slice_data(stacks, quantile=0.99, device=torch.device("cpu"))
    motion = SliceMotion(data.n_slices, torch.device("cpu"))
    points = slice_points(stacks)
    header = slice_table(data, motion, torch.ones(data.n_slices), stacks)
    set_motion_from_table(data, motion, stacks, sim.motions)
    truth = slice_table(data, motion, torch.ones(data.n_slices), stacks)
    assert summarise(motion_errors(truth, sim.motions, points))["rot_max"] < 1e-3
    assert summarise(motion_errors(header, sim.motions, points))["rot_median"] > 2.0
