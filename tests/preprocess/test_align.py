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
