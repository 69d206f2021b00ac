"""The simulator's acquisition geometry."""

import numpy as np
from helpers import stack_from_simulated

from gsvr.simulate.stacks import SimulationConfig, simulate_stacks


def test_field_of_view_and_slice_count_can_be_set_like_a_clinical_protocol(small_subject):
    vol, mask, affine = small_subject
    cfg = SimulationConfig(n_stacks=2, inplane_spacing_mm=1.6, thickness_mm=3.0, slice_spacing_mm=3.3, inplane_fov_mm=160.0,
                           n_slices=12, motion_rotation_deg=0.0, motion_translation_mm=0.0, noise_level=0.0,
                           through_plane_samples=5, seed=0)
    sim = simulate_stacks(vol, mask, affine, cfg)
    for s in sim.stacks:
        assert s.data.shape == (100, 100, 12)
        assert np.allclose(np.linalg.norm(s.affine[:3, :3], axis=0), [1.6, 1.6, 3.3])
        assert s.thickness_mm == 3.0
        # Centred on the brain: the middle slice holds more brain than the end slices.
        per_slice = s.mask.sum(axis=(0, 1))
        assert per_slice[5:7].min() > max(per_slice[0], per_slice[-1])


def test_a_head_turn_between_stacks_moves_the_anatomy_not_the_header(small_subject):
    from scipy.spatial.transform import Rotation

    from gsvr.evaluate.assess import compare_pixels, simulate_stack

    vol, mask, affine = small_subject
    common = dict(n_stacks=1, inplane_spacing_mm=1.6, thickness_mm=4.0, motion_rotation_deg=0.0, motion_translation_mm=0.0,
                  noise_level=0.0, fov_margin_mm=4.0, through_plane_samples=11, seed=3)
    still = simulate_stacks(vol, mask, affine, SimulationConfig(**common)).stacks[0]
    sim = simulate_stacks(vol, mask, affine, SimulationConfig(stack_rotation_deg=25.0, **common))
    turned = sim.stacks[0]
    assert np.allclose(turned.affine, still.affine)  # same header
    rows = sim.motions
    rotvec = rows[["rx_deg", "ry_deg", "rz_deg"]].to_numpy()
    assert np.allclose(rotvec, rotvec[0]) and np.linalg.norm(rotvec[0]) > 5  # one turn for the whole stack, recorded
    assert np.allclose(rows[["cx_mm", "cy_mm", "cz_mm"]].to_numpy(), sim.centre_mm)  # about the brain centre
    # The anatomy at world q shows at header position R^-1 (q - c) + c.
    r = Rotation.from_rotvec(np.radians(rotvec[0])).as_matrix()
    to_stack = np.eye(4)
    to_stack[:3, :3] = r.T
    to_stack[:3, 3] = sim.centre_mm - r.T @ sim.centre_mm
    stack = stack_from_simulated(turned)
    acquired = stack.data[stack.mask].astype(float)
    ncc_true, _ = compare_pixels(simulate_stack(vol, affine, stack, to_stack), acquired)
    ncc_header, _ = compare_pixels(simulate_stack(vol, affine, stack), acquired)
    assert ncc_true > 0.97 and ncc_header < ncc_true - 0.1, (ncc_true, ncc_header)
