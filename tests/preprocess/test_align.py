"""Stack-to-stack rigid alignment with a multi-start over rotations."""

import numpy as np
import pytest
from helpers import stacks_from_simulation as _stacks
from scipy.spatial.transform import Rotation

from gsvr.io.nifti import Stack
from gsvr.preprocess.align import align_stacks, interslice_consistency, register_stack, start_rotations
from gsvr.simulate.stacks import SimulationConfig, simulate_stacks

SIM = dict(inplane_spacing_mm=1.6, thickness_mm=4.0, noise_level=0.01, fov_margin_mm=4.0, through_plane_samples=11)


def test_start_rotations_cover_the_sphere_of_turns_to_90_degrees():
    mats = start_rotations(90.0, 45.0)
    assert np.allclose(mats[0], np.eye(3))
    assert all(np.allclose(m @ m.T, np.eye(3)) for m in mats)
    # Any rotation up to 90 deg lies within 35 deg of a start (the coarse registration's capture range).
    rng = np.random.default_rng(0)
    worst = 0.0
    for r in Rotation.random(200, random_state=1):
        r = Rotation.from_rotvec(r.as_rotvec() / np.linalg.norm(r.as_rotvec()) * np.radians(rng.uniform(0, 90)))
        worst = max(worst, min(np.degrees((Rotation.from_matrix(m).inv() * r).magnitude()) for m in mats))
    assert worst < 35.0, worst


@pytest.mark.slow
@pytest.mark.parametrize("angle_deg", [20.0, 60.0, 85.0])
def test_a_stack_turned_by_up_to_90_degrees_is_brought_back(small_subject, angle_deg):
    vol, mask, affine = small_subject
    sim = simulate_stacks(vol, mask, affine, SimulationConfig(n_stacks=2, motion_rotation_deg=0.0, motion_translation_mm=0.0, seed=9, **SIM))
    ref, moving = _stacks(sim)
    centre = affine[:3, :3] @ np.argwhere(mask).mean(0) + affine[:3, 3]
    axis = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    turn = np.eye(4)
    turn[:3, :3] = Rotation.from_rotvec(np.radians(angle_deg) * axis).as_matrix()
    turn[:3, 3] = centre - turn[:3, :3] @ centre + [4.0, -3.0, 2.0]
    turned = Stack(data=moving.data, mask=moving.mask, affine=turn @ moving.affine, thickness_mm=moving.thickness_mm, name="turned")
    transform, _ = register_stack(ref, turned)
    residual = transform @ turn  # identity when the turn is undone
    rot_err = np.degrees(Rotation.from_matrix(residual[:3, :3]).magnitude())
    shift_err = np.linalg.norm(residual[:3, :3] @ centre + residual[:3, 3] - centre)
    assert rot_err < 3.0 and shift_err < 1.5, (rot_err, shift_err)


def test_the_reference_is_the_stack_with_the_least_interslice_motion(small_subject):
    vol, mask, affine = small_subject
    still = _stacks(simulate_stacks(vol, mask, affine, SimulationConfig(n_stacks=1, motion_rotation_deg=0.0, motion_translation_mm=0.0, seed=2, **SIM)))[0]
    moved = _stacks(simulate_stacks(vol, mask, affine, SimulationConfig(n_stacks=1, motion_rotation_deg=8.0, motion_translation_mm=4.0, seed=2, **SIM)))[0]
    assert interslice_consistency(still) > interslice_consistency(moved)
    out, ref = align_stacks([moved, still], max_angle_deg=0.0)
    assert ref == 1 and out[1] is still


def test_the_joint_choice_keeps_the_pose_all_stacks_agree_on_over_a_flip_the_reference_prefers(small_subject, monkeypatch):
    """Stack 1's flipped candidate (1) correlates with the reference better than its right pose (0, the header),
    but stacks 2 and 3 (each with one right candidate) agree with the right pose only: the joint choice keeps 0,
    the reference alone would take 1."""
    from gsvr.preprocess import align

    table = {(1, 0, 0, 0): 0.40, (1, 1, 0, 0): 0.48,  # stack 1's candidates against the reference
             (2, 0, 0, 0): 0.45, (3, 0, 0, 0): 0.45,
             (1, 0, 2, 0): 0.50, (1, 1, 2, 0): 0.20, (1, 0, 3, 0): 0.50, (1, 1, 3, 0): 0.20, (2, 0, 3, 0): 0.50}

    class Placed:
        def __init__(self, stacks, candidates):
            pass

        def correlation(self, i, k, j, l):
            return table.get((i, k, j, l), table.get((j, l, i, k)))

    monkeypatch.setattr(align, "_PlacedStacks", Placed)
    candidates = [[np.eye(4)], [np.eye(4), np.eye(4)], [np.eye(4)], [np.eye(4)]]
    assert align.choose_jointly([None] * 4, candidates, reference=0) == [0, 0, 0, 0]
    # With only the reference to agree with, a far candidate must beat the header by the margin (0.1): the
    # flip's 0.08 lead keeps the header, a 0.12 lead does not.
    assert align.choose_jointly([None] * 2, candidates[:2], reference=0) == [0, 0]
    table[1, 1, 0, 0] = 0.52
    assert align.choose_jointly([None] * 2, candidates[:2], reference=0) == [0, 1]


@pytest.mark.slow
def test_stacks_turned_apart_are_all_brought_into_the_reference_frame(small_subject):
    """Three stacks, two of them turned by 35 and 70 deg about different axes: each ends within a few degrees
    of the reference's frame (the turns are applied about the brain centre, the alignment undoes them)."""
    vol, mask, affine = small_subject
    sim = simulate_stacks(vol, mask, affine, SimulationConfig(n_stacks=3, motion_rotation_deg=0.0, motion_translation_mm=0.0, seed=5, **SIM))
    stacks = _stacks(sim)
    centre = affine[:3, :3] @ np.argwhere(mask).mean(0) + affine[:3, 3]
    turns = [np.eye(4)]
    for angle, axis in ((35.0, [1.0, 0.2, 0.0]), (70.0, [0.0, -0.4, 1.0])):
        turn = np.eye(4)
        turn[:3, :3] = Rotation.from_rotvec(np.radians(angle) * np.asarray(axis) / np.linalg.norm(axis)).as_matrix()
        turn[:3, 3] = centre - turn[:3, :3] @ centre
        turns.append(turn)
    turned = [Stack(data=s.data, mask=s.mask, affine=t @ s.affine, thickness_mm=s.thickness_mm, name=f"s{k}")
              for k, (s, t) in enumerate(zip(stacks, turns))]
    out, ref = align_stacks(turned, reference=0, mask_dilation_mm=3.0)
    assert ref == 0 and out[0] is turned[0]
    for k in (1, 2):
        residual = out[k].alignment @ turns[k]  # identity when the turn is undone
        assert np.degrees(Rotation.from_matrix(residual[:3, :3]).magnitude()) < 3.0, (k, residual)
