"""Sampling a model on the output grid; saving and loading models.

The model is built by hand (three Gaussians, a few support points) so that the sampled volume can be
compared voxel by voxel with the analytic field; the model of a real reconstruction is sampled back to
its result's volume in tests/recon/test_end_to_end.py.
"""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from gsvr.errors import GsvrError
from gsvr.model.field import GaussianField
from gsvr.recon.config import ReconConfig
from gsvr.recon.volume import MODEL_FORMAT, load_model, output_grid, sample_volume, save_model

MEANS = np.array([[1.0, 1.0, 0.5], [4.0, 0.0, 1.0], [0.0, 4.0, 0.0]])
SCALES = np.array([[1.5, 1.0, 2.0], [2.0, 2.0, 2.0], [1.0, 1.0, 1.0]])
QUATS = np.array([[0.9, 0.2, -0.3, 0.1], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])  # (w, x, y, z)
VALUES = np.array([1.0, 0.8, -3.0])  # the negative one drives part of the volume below 0 (clamped)
SUPPORT = np.array([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0], [0.0, 5.0, 0.0], [2.0, 2.0, 4.0]])
RADIUS, ORIGIN, SCALE = 3.07, np.array([100.0, -50.0, 20.0]), 2.5


def _model():
    field = GaussianField(torch.tensor(MEANS), torch.log(torch.tensor(SCALES)), torch.tensor(QUATS), torch.tensor(VALUES),
                          mode="exact")
    # The settings sample_volume reads (neighbours, k-NN backend, delta) as the engine stores them: the defaults.
    return {"field": field.state(), "origin_mm": ORIGIN.copy(), "intensity_scale": SCALE,
            "support_points": torch.tensor(SUPPORT, dtype=torch.float32), "support_radius_mm": RADIUS,
            "config": ReconConfig().to_dict()}


def _analytic(world):
    """Field (float64) at world points [P, 3]: the clamped sum of the three Gaussians; and the distance to the support."""
    local = world - ORIGIN
    total = np.zeros(len(world))
    for mean, scale, quat, value in zip(MEANS, SCALES, QUATS, VALUES):
        rot = Rotation.from_quat(np.roll(quat, -1)).as_matrix()  # scipy: (x, y, z, w)
        prec = rot @ np.diag(scale ** -2.0) @ rot.T
        v = local - mean
        total += value * np.exp(-0.5 * np.einsum("pi,ij,pj->p", v, prec, v))
    dist = np.linalg.norm(local[:, None, :] - SUPPORT[None], axis=-1).min(1)
    return total, dist


def _voxel_world(vol):
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in vol.data.shape], indexing="ij"), -1).reshape(-1, 3)
    return ijk @ vol.affine[:3, :3].T + vol.affine[:3, 3]


@pytest.mark.parametrize("resolution_mm", [1.0, 0.7])
def test_the_sampled_volume_is_the_clamped_field_inside_the_support_and_zero_outside(resolution_mm):
    vol = sample_volume(_model(), resolution_mm=resolution_mm)
    assert vol.data.dtype == np.float32
    assert np.allclose(vol.affine[:3, :3], np.eye(3) * resolution_mm)
    total, dist = _analytic(_voxel_world(vol))
    got = vol.data.reshape(-1).astype(np.float64)
    clear = np.abs(dist - RADIUS) > 1e-3  # voxels on the support's boundary may round either way
    assert clear.mean() > 0.99
    inside = clear & (dist < RADIUS)
    outside = clear & (dist > RADIUS)
    assert inside.sum() > 100 and outside.sum() > 100
    np.testing.assert_allclose(got[inside], SCALE * np.maximum(total[inside], 0.0), rtol=1e-5, atol=1e-6)
    assert (got[outside] == 0).all()
    assert (total[outside] > 1e-3).any()  # there is field outside the support: it is masked, not absent
    assert (total[inside] < -1e-3).sum() > 5  # negative sums were clamped to 0


def test_the_sampled_volume_does_not_depend_on_the_chunk_size():
    model = _model()
    assert np.array_equal(sample_volume(model, resolution_mm=1.0, chunk=37).data, sample_volume(model, resolution_mm=1.0).data)


@pytest.mark.parametrize("resolution_mm", [0.0, -1.0, float("nan"), float("inf")])
def test_a_non_positive_or_non_finite_resolution_is_refused(resolution_mm):
    with pytest.raises(GsvrError, match="resolution must be a finite number > 0"):
        sample_volume(_model(), resolution_mm=resolution_mm)


@pytest.mark.parametrize("resolution_mm,margin_mm", [(1.0, 3.0), (0.8, 0.0), (2.5, 1.2)])
def test_the_output_grid_covers_the_points_and_margin_at_the_requested_resolution(resolution_mm, margin_mm):
    pts = np.random.default_rng(1).normal(size=(200, 3)) * [10.0, 6.0, 3.0] + [5.0, -2.0, 40.0]
    shape, affine = output_grid(pts, resolution_mm, margin_mm)
    assert np.array_equal(affine[:3, :3], np.eye(3) * resolution_mm) and np.array_equal(affine[3], [0, 0, 0, 1])
    lo, hi = pts.min(0) - margin_mm, pts.max(0) + margin_mm
    assert np.allclose(affine[:3, 3], lo)  # the first voxel centre at the low corner
    last = affine[:3, 3] + (np.array(shape) - 1) * resolution_mm
    assert (last >= hi - 1e-9).all()  # the last voxel centre at or beyond the high corner ...
    assert (last - resolution_mm < hi).all()  # ... by less than a voxel: no spare row
    ijk = (pts - affine[:3, 3]) / resolution_mm
    assert (ijk >= margin_mm / resolution_mm - 1e-9).all() and (ijk <= np.array(shape) - 1 - margin_mm / resolution_mm + 1e-9).all()


def test_save_and_load_round_trip_a_model(tmp_path):
    model = _model()
    save_model(tmp_path / "m.pt", model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # written atomically, no temporary left
    loaded = load_model(tmp_path / "m.pt")
    assert loaded["format"] == MODEL_FORMAT and set(loaded) == set(model) | {"format"}
    for key in ("means", "log_scales", "quats", "values"):
        assert torch.equal(loaded["field"][key], model["field"][key]), key
    assert loaded["field"]["mode"] == "exact" and loaded["config"] == model["config"]
    assert torch.equal(loaded["support_points"], model["support_points"]) and np.array_equal(loaded["origin_mm"], ORIGIN)
    a, b = sample_volume(model, resolution_mm=1.0), sample_volume(loaded, resolution_mm=1.0)
    assert np.array_equal(a.data, b.data) and np.array_equal(a.affine, b.affine)


def test_load_model_refuses_missing_foreign_and_damaged_files(tmp_path):
    with pytest.raises(GsvrError, match="does not exist"):
        load_model(tmp_path / "none.pt")
    torch.save({"field": {}}, tmp_path / "other.pt")
    with pytest.raises(GsvrError, match="not a gsvr model file"):
        load_model(tmp_path / "other.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(GsvrError, match="cannot read gsvr model"):
        load_model(tmp_path / "bad.pt")
