"""Tiny end-to-end runs on the demo subject downsampled to 1.6 mm (seconds on 2 cores)."""

import numpy as np
import pytest
from helpers import stacks_from_simulation as _stacks

from gsvr.evaluate import evaluate_volume
from gsvr.recon.config import ReconConfig
from gsvr.recon.engine import reconstruct
from gsvr.recon.files import METHODS
from gsvr.recon.volume import sample_volume
from gsvr.simulate.stacks import SimulationConfig, simulate_stacks

SIM = dict(inplane_spacing_mm=1.6, thickness_mm=4.0, noise_level=0.01, fov_margin_mm=4.0, through_plane_samples=11)
FAST = ReconConfig.from_dict({"init": {"n_gaussians": 6000}, "model": {"k_neighbors": 16}, "output": {"resolution_mm": 1.6},
                              "svr": {"spacings_mm": [3.2, 3.2, 2.4, 2.4, 2.4]}})


def _stack_average_psnr(sim, vol, mask, affine):
    """Floor: the stack_average method (stacks resampled in header geometry), scored without registration."""
    floor = METHODS["stack_average"](_stacks(sim), FAST, progress=False).volume
    return evaluate_volume(floor.data, floor.affine, vol, affine, mask, register=False).psnr


@pytest.mark.slow
def test_oblique_stacks_without_motion_put_the_anatomy_where_the_ground_truth_has_it(small_subject):
    vol, mask, affine = small_subject
    sim = simulate_stacks(vol, mask, affine, SimulationConfig(obliquity_deg=15.0, motion_rotation_deg=0.0, motion_translation_mm=0.0, seed=3, **SIM))
    result = reconstruct(_stacks(sim), FAST.updated({"motion": False, "joint.steps": 120}), progress=False)
    ev = evaluate_volume(result.volume.data, result.volume.affine, vol, affine, mask)
    assert ev.registration_rotation_deg < 1.0
    assert ev.registration_translation_mm < 1.0
    assert ev.psnr > _stack_average_psnr(sim, vol, mask, affine), ev


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gsvr", "svr_classic"])
def test_simulate_reconstruct_evaluate_beats_the_stack_average(small_subject, method):
    vol, mask, affine = small_subject
    sim = simulate_stacks(vol, mask, affine, SimulationConfig(obliquity_deg=5.0, motion_rotation_deg=4.0, motion_translation_mm=3.0, seed=4, **SIM))
    result = METHODS[method](_stacks(sim), FAST, progress=False)
    ev = evaluate_volume(result.volume.data, result.volume.affine, vol, affine, mask)
    floor = _stack_average_psnr(sim, vol, mask, affine)
    assert np.isfinite([ev.psnr, ev.ssim, ev.ncc, ev.nrmse]).all()
    assert ev.psnr > floor + 2.0, (ev.psnr, floor)
    assert len(result.slices) == sum(int((s.mask > 0).any(axis=(0, 1)).sum()) for s in sim.stacks)
    assert set(result.slices.columns) >= {"stack", "slice_index", "rx_deg", "tx_mm", "intensity_scale", "weight"}


def test_reconstruction_is_deterministic_on_cpu(small_subject):
    vol, mask, affine = small_subject
    sim = simulate_stacks(vol, mask, affine, SimulationConfig(n_stacks=2, seed=5, **SIM))
    cfg = ReconConfig.from_dict({"init": {"n_gaussians": 1500}, "model": {"k_neighbors": 8, "knn_every": 3},
                                 "joint": {"steps": 6}, "output": {"resolution_mm": 3.2}, "svr": {"spacings_mm": [3.2, 3.2, 2.4]},
                                 "fit": {"steps": 20}})
    a = reconstruct(_stacks(sim), cfg, progress=False)
    b = reconstruct(_stacks(sim), cfg, progress=False)
    assert np.array_equal(a.volume.data, b.volume.data)
    assert a.slices.equals(b.slices)


def test_sample_volume_renders_a_saved_model_at_another_resolution(small_subject, tmp_path):
    from gsvr.recon.volume import load_model, save_model

    vol, mask, affine = small_subject
    sim = simulate_stacks(vol, mask, affine, SimulationConfig(n_stacks=2, seed=6, **SIM))
    res = reconstruct(_stacks(sim), ReconConfig.from_dict({
        "init": {"n_gaussians": 1500}, "model": {"k_neighbors": 8}, "joint": {"steps": 4}, "output": {"resolution_mm": 3.2},
        "svr": {"spacings_mm": [3.2, 3.2, 2.4]}, "fit": {"steps": 20}, "align": None}),
                      progress=False)
    save_model(tmp_path / "m.pt", res.model)
    model = load_model(tmp_path / "m.pt")
    same = sample_volume(model, resolution_mm=3.2)
    assert np.allclose(same.data, res.volume.data) and np.allclose(same.affine, res.volume.affine)
    fine = sample_volume(model, resolution_mm=1.6)
    assert np.allclose(np.linalg.norm(fine.affine[:3, :3], axis=0), 1.6)
    # The same world extent, twice the voxels per axis (up to one voxel of rounding).
    assert all(abs(f - 2 * (c - 1) - 1) <= 1 for f, c in zip(fine.data.shape, same.data.shape))


@pytest.mark.slow
@pytest.mark.parametrize("method,robust", [("gsvr", "slice"), ("svr_classic", "slice")])
def test_corrupted_slices_get_the_lowest_weights_and_cost_little(small_subject, method, robust):
    """Issue 5: 10 % corrupted slices (signal void or x0.3) cost <= 1 dB against the clean case, and
    the lowest-weight 10 % of slices hold >= 80 % of the corrupted ones, with GSVR's slice weights
    (the default). The EM robust statistics (``svr: {robust: em}``) catch 3 of these 5 only: not listed."""
    vol, mask, affine = small_subject
    results = {}
    for frac in (0.0, 0.1):
        sim = simulate_stacks(vol, mask, affine, SimulationConfig(obliquity_deg=5.0, motion_rotation_deg=3.0, motion_translation_mm=2.0,
                                                                  corrupted_fraction=frac, seed=8, **SIM))
        res = METHODS[method](_stacks(sim), FAST.updated({"svr.robust": robust}), progress=False)
        results[frac] = (sim, res, evaluate_volume(res.volume.data, res.volume.affine, vol, affine, mask).psnr)
    sim, res, psnr = results[0.1]
    truth = sim.motions.set_index(["stack_index", "slice_index"])["corrupted"]
    bad = np.array([truth.loc[(st, sl)] in ("void", "dark") for st, sl in zip(res.slices["stack_index"], res.slices["slice_index"])])
    assert bad.sum() >= 3
    lowest = res.slices["weight"].rank(method="first").to_numpy() <= int(np.ceil(0.1 * len(res.slices)))
    caught = (bad & lowest).sum() / bad.sum()
    assert caught >= 0.8, (caught, bad.sum())
    assert psnr >= results[0.0][2] - 1.0, (psnr, results[0.0][2])


@pytest.mark.parametrize("method", ["gsvr", "svr_classic"])
def test_a_single_stack_gives_a_volume_with_a_warning(small_subject, method):
    vol, mask, affine = small_subject
    sim = simulate_stacks(vol, mask, affine, SimulationConfig(motion_rotation_deg=2.0, motion_translation_mm=1.0, seed=5, **SIM))
    with pytest.warns(UserWarning, match="single stack"):
        result = METHODS[method](_stacks(sim)[:1], FAST, progress=False)
    assert np.isfinite(result.volume.data).all() and result.volume.data.max() > 0


def test_the_stack_average_floor_keeps_the_anatomy_in_place_and_a_row_per_slice(small_subject):
    vol, mask, affine = small_subject
    sim = simulate_stacks(vol, mask, affine, SimulationConfig(obliquity_deg=10.0, motion_rotation_deg=0.0, motion_translation_mm=0.0, seed=6, **SIM))
    result = METHODS["stack_average"](_stacks(sim), FAST, progress=False)
    ev = evaluate_volume(result.volume.data, result.volume.affine, vol, affine, mask)
    assert ev.registration_rotation_deg < 1.0 and ev.registration_translation_mm < 1.0, ev
    assert ev.ncc > 0.7, ev  # the right anatomy, blurred by three 4 mm slice profiles (measured: NCC 0.78, 21.8 dB)
    assert len(result.slices) == sum(int((s.mask > 0).any(axis=(0, 1)).sum()) for s in sim.stacks)
    assert (result.slices["weight"] == 1).all() and result.history.empty
