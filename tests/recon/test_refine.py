"""The refinement on the slices: its two renders (through the output grid, at the PSF nodes), its held-out split, its
stopping rule, and the stage end to end."""

import dataclasses

import numpy as np
import pytest
import torch

from gsvr.evaluate import evaluate_volume
from gsvr.model.field import GaussianField
from gsvr.recon.config import ModelConfig, RefineConfig, SvrSettings
from gsvr.recon.engine import reconstruct
from gsvr.ops.gaussians import gaussian_sum
from gsvr.ops.knn import knn
from gsvr.ops.voxel import VoxelGrid
from gsvr.geometry import axis_angle_to_matrix, matrix_to_axis_angle
from gsvr.recon.refine import (GridQuadrature, PsfQuadrature, VoxelNeighbours, field_on_grid, holdout_slices, refine_field,
                               register_to_field)
from gsvr.recon.slices import SliceMotion, build_slice_data
from gsvr.recon.registration import register
from gsvr.recon.svr import SliceOperator, output_super_resolution, output_support, support_mask
from gsvr.recon.forward import current_positions
from gsvr.recon.volume import sample_volume
from gsvr.recon.stages import refine as refine_stage
from gsvr.recon.config import ReconConfig
from gsvr.simulate.stacks import SimulationConfig, simulate_stacks
from helpers import stacks_from_simulation

MODEL = ModelConfig(k_neighbors=12)


@pytest.mark.parametrize("n_slices,fraction,expected", [(100, 0.1, 10), (54, 0.1, 5), (7, 0.1, 1), (2, 0.9, 1)])
def test_held_out_slices_are_a_fixed_share_at_least_one_never_all(n_slices, fraction, expected):
    held = holdout_slices(n_slices, fraction)
    assert held.dtype == torch.bool and held.shape == (n_slices,)
    assert int(held.sum()) == expected
    assert torch.equal(held, holdout_slices(n_slices, fraction))  # the same slices in every run


def test_held_out_slices_spread_over_the_depth():
    held = torch.nonzero(holdout_slices(90, 0.1))[:, 0]
    assert held.min() < 30 and held.max() >= 60  # not a block of neighbours


@pytest.fixture(scope="module")
def case(tiny_stacks):
    """Slices at their true (identity) motion, the output-grid super-resolution of all of them and a field of
    Gaussians on its voxels: a field that already predicts the slices well."""
    data = build_slice_data(tiny_stacks, quantile=0.99, device="cpu")
    motion = SliceMotion(data.n_slices, "cpu")
    s = SvrSettings(output_tikhonov_factors=None)
    ones = torch.ones(data.n_pixels)
    svr = output_super_resolution(data, motion, ones, s, 2.4, 6.0)
    inside = svr.volume > 0.05
    pts = svr.grid.points("cpu")[inside]
    field = GaussianField(pts, torch.full_like(pts, np.log(1.2)), torch.tensor([[1.0, 0, 0, 0]]).repeat(len(pts), 1),
                          svr.volume[inside], mode="normalized")
    return data, motion, s, field


def test_the_quadrature_predicts_the_slices_as_the_voxel_operator_samples_the_same_volume(case):
    """The render's contract: the field sampled at the voxel operator's PSF nodes, weighted, scaled."""
    data, motion, s, field = case
    pixels = torch.arange(0, data.n_pixels, 7)
    q = PsfQuadrature(data, motion, s, pixels, torch.ones(data.n_pixels))
    q.refresh(field, MODEL.k_neighbors, "kdtree")
    op = SliceOperator(data, motion, None, s, pixels)
    nodes = (op.x[:, None, :] + op.off[op.sid]).reshape(-1, 3)
    expected = (field.sample(nodes, k=MODEL.k_neighbors, delta=MODEL.delta).reshape(len(pixels), -1) * op.node_w).sum(-1)
    err = float(((expected - data.y[pixels]) ** 2).mean())
    assert q.error(field, MODEL) == pytest.approx(err, rel=1e-4)


def _grid(data, spacing_mm=2.4, radius_mm=6.0):
    """The output grid of the slices at their (identity) motion and its support, as the refine stage takes them."""
    grid = VoxelGrid.covering(data.x0, spacing_mm, radius_mm)
    return grid, support_mask(grid, data.x0, radius_mm)


@pytest.mark.parametrize("psf", [True, False])
def test_the_grid_quadrature_predicts_the_slices_from_the_field_sampled_on_the_output_grid(case, psf):
    """Its contract, against an independent computation: the field sampled at every voxel of the support (zero beyond
    it), acquired by the voxel operator's interpolation (not its matrix; without the PSF, at the pixel centres), times
    the slice scales; the weighted error over chosen rows, and that error's gradient in every parameter of the field."""
    data, _, s, field = case
    field = GaussianField.from_state(field.state())
    motion = SliceMotion(data.n_slices, "cpu")
    with torch.no_grad():
        motion.log_scale.copy_(torch.linspace(-0.1, 0.1, data.n_slices))
    pixels = torch.arange(0, data.n_pixels, 5)
    weight = torch.rand(data.n_pixels, generator=torch.Generator().manual_seed(1)) + 0.5
    rows = torch.arange(0, len(pixels), 3)
    grid, covered = _grid(data)
    q = GridQuadrature(data, motion, s, pixels, weight, VoxelNeighbours(grid, covered), owns=True, psf=psf)
    q.refresh(field, MODEL.k_neighbors, "kdtree")
    assert len(q.voxels.index) < int(covered.sum())  # only the voxels the pixels see are evaluated

    volume = torch.zeros(grid.shape)
    pts = grid.points()[covered]
    nbr = knn(field.means.detach(), pts, MODEL.k_neighbors, backend="kdtree")
    volume[covered] = gaussian_sum(pts, nbr, field.tables(), mode=MODEL.render_mode, delta=MODEL.delta)
    op = SliceOperator(data, motion, grid, s if psf else dataclasses.replace(s, psf_normal=1, psf_inplane=1), pixels)
    pred = torch.exp(motion.log_scale)[data.slice_idx[pixels]] * op.forward(volume)
    w, res = weight[pixels][rows], (pred - data.y[pixels])[rows]
    loss = (w * res.square()).sum() / w.sum()
    loss.backward()
    expected = float(loss.detach())
    want = [p.grad.clone() for p in field.parameters()]
    field.zero_grad(set_to_none=True)

    assert q.error(field, MODEL, rows) == pytest.approx(expected, rel=1e-4)
    assert all(p.grad is None for p in field.parameters())  # no gradient without backward
    assert q.error(field, MODEL, rows, backward=True) == pytest.approx(expected, rel=1e-4)
    for got, ref in zip((p.grad for p in field.parameters()), want):
        assert torch.allclose(got, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max())), float((got - ref).abs().max())


def test_quadratures_that_share_voxels_rebuild_their_neighbours_only_where_they_own_them(case):
    """The held-out quadrature builds the shared table only when it is missing; the training one rebuilds it when the
    field's means have moved, not when they have not; a quadrature added after the voxels are fixed is refused."""
    data, motion, s, field = case
    field = GaussianField.from_state(field.state())
    grid, covered = _grid(data)
    voxels = VoxelNeighbours(grid, covered)
    train, test = _split(data)
    ones = torch.ones(data.n_pixels)
    owner = GridQuadrature(data, motion, s, train, ones, voxels, owns=True)
    other = GridQuadrature(data, motion, s, test, ones, voxels, owns=False)
    other.refresh(field, MODEL.k_neighbors, "kdtree")  # missing: built
    first = voxels.nbr
    owner.refresh(field, MODEL.k_neighbors, "kdtree")  # the same means: kept
    assert voxels.nbr is first
    with torch.no_grad():
        field.means.add_(torch.randn(field.means.shape, generator=torch.Generator().manual_seed(2)) * 2.0)
    other.refresh(field, MODEL.k_neighbors, "kdtree")  # not its table to rebuild
    assert voxels.nbr is first
    owner.refresh(field, MODEL.k_neighbors, "kdtree")
    assert voxels.nbr is not first and not torch.equal(voxels.nbr, first)
    with pytest.raises(RuntimeError, match="after the voxels were fixed"):
        GridQuadrature(data, motion, s, test, ones, voxels, owns=False)
    with pytest.raises(ValueError, match="support of shape"):
        VoxelNeighbours(grid, covered[:-1])


def test_the_voxel_values_are_computed_again_only_when_the_field_or_the_table_changes(case):
    """A held-out evaluation and the training step after it read the same values (kept); any change of a parameter
    (an optimiser step), a new neighbour table or another field gives values computed afresh, equal to an
    evaluation from scratch."""
    data, _, s, field = case
    field = GaussianField.from_state(field.state())
    voxels = VoxelNeighbours(*_grid(data))
    voxels.see(voxels.covered)
    voxels.refresh(field, MODEL.k_neighbors, "kdtree")

    def fresh(f):
        return gaussian_sum(voxels.points, voxels.nbr.long(), f.tables(), mode=MODEL.render_mode, delta=MODEL.delta)

    first = voxels.values(field, MODEL)
    assert voxels.values(field, MODEL) is first
    torch.testing.assert_close(first, fresh(field))
    gen = torch.Generator().manual_seed(3)
    for name in ("means", "log_scales", "quats", "values"):  # each parameter, in place as an optimiser step changes it
        with torch.no_grad():
            param = getattr(field, name)
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
        again = voxels.values(field, MODEL)
        assert again is not first and not torch.equal(again, first)
        torch.testing.assert_close(again, fresh(field))
        first = again
    voxels.refresh(field, MODEL.k_neighbors, "kdtree")  # the means moved: a new table
    assert voxels.values(field, MODEL) is not first
    other = GaussianField.from_state(field.state())  # equal parameters, other tensors
    assert voxels.values(other, MODEL) is not voxels.values(field, MODEL)


@pytest.mark.parametrize("mode", ["normalized", "exact"])
def test_the_gradient_from_what_the_values_kept_equals_the_gradient_evaluated_again(case, monkeypatch, mode):
    """The backward pass reads what :meth:`VoxelNeighbours.values` kept for it (``for_gradient``), up to
    ``KEPT_BYTES``, without evaluating the field again; chunks beyond them, or parts kept for parameters changed since,
    are evaluated again. Every way gives the gradient autograd gives through the plain Gaussian sum, and the backward
    pass lets go of what was kept."""
    import gsvr.recon.refine as refine_module
    data, _, s, field = case
    model = dataclasses.replace(MODEL, chunk_pixels=64, render_mode=mode)  # several chunks
    voxels = VoxelNeighbours(*_grid(data))
    voxels.see(voxels.covered)
    voxels.refresh(field, model.k_neighbors, "kdtree")
    grad = torch.randn(len(voxels.points), generator=torch.Generator().manual_seed(4))
    grad[::7] = 0.0
    n_chunks = -(-len(voxels.points) // model.chunk_pixels)
    assert n_chunks > 2

    def reference(f):
        f = GaussianField.from_state(f.state())
        out = gaussian_sum(voxels.points, voxels.nbr.long(), f.tables(), mode=model.render_mode, delta=model.delta)
        (out * grad).sum().backward()
        return [p.grad for p in f.parameters()]

    def through_voxels(f, kept_bytes, change=None):
        monkeypatch.setattr(refine_module, "KEPT_BYTES", kept_bytes)
        f = GaussianField.from_state(f.state())
        voxels.values(f, model, for_gradient=True)
        n_kept = sum(part is not None for part in voxels._parts)
        if change is not None:
            with torch.no_grad():
                f.values.add_(change)
        with monkeypatch.context() as m:
            if n_kept == n_chunks and change is None:  # all kept: the backward must not evaluate the field again
                m.setattr(refine_module, "gaussian_sum_parts", None)
            voxels.backward(f, model, grad)
        assert voxels._parts is None
        return [p.grad for p in f.parameters()], f, n_kept

    per_chunk = model.chunk_pixels * (model.k_neighbors * 32 + 8)  # the [P, K] parts, the sum and its denominator
    every, _, n_every = through_voxels(field, 2**40)
    scatter_bytes = 4 * (model.chunk_pixels * model.k_neighbors + field.n + 1) * (n_chunks // 2)
    monkeypatch.setattr(refine_module, "SCATTER_BYTES", scatter_bytes)  # half the chunks by index_add_
    voxels._scatter = None
    partly, _, _ = through_voxels(field, 2**40)
    assert len(voxels._scatter[1]) == n_chunks // 2
    for a, b in zip(every, partly, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(a.abs().max()))
    monkeypatch.undo()
    voxels._scatter = None  # built again for every chunk
    half, _, n_half = through_voxels(field, per_chunk * (n_chunks // 2))
    none, _, n_none = through_voxels(field, 0)
    assert (n_every, n_none) == (n_chunks, 0) and 0 < n_half < n_chunks
    for a, b, c, ref in zip(every, half, none, reference(field), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
        torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    stale, changed, _ = through_voxels(field, 2**40, change=0.1)  # the parameters moved after the values were kept
    for a, ref in zip(stale, reference(changed), strict=True):
        torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    moved = GaussianField.from_state(field.state())  # a new neighbour table: the scatter of the old one is not used
    with torch.no_grad():
        moved.means.add_(torch.randn(moved.means.shape, generator=torch.Generator().manual_seed(5)))
    old_nbr = voxels.nbr
    voxels.refresh(moved, model.k_neighbors, "kdtree")
    assert not torch.equal(voxels.nbr, old_nbr)
    after, _, _ = through_voxels(moved, 2**40)
    for a, ref in zip(after, reference(moved), strict=True):
        torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def _split(data, fraction=0.2):
    held = holdout_slices(data.n_slices, fraction)[data.slice_idx]
    return torch.nonzero(~held)[:, 0], torch.nonzero(held)[:, 0]


def _quadratures(kind, data, motion, s, train, test, weight):
    """Training and held-out quadratures of either render (through the grid they share the voxels, as in the stage)."""
    if kind == "nodes":
        return PsfQuadrature(data, motion, s, train, weight), PsfQuadrature(data, motion, s, test, weight)
    voxels = VoxelNeighbours(*_grid(data))
    return (GridQuadrature(data, motion, s, train, weight, voxels, owns=True),
            GridQuadrature(data, motion, s, test, weight, voxels, owns=False))


@pytest.mark.parametrize("kind", ["grid", "nodes"])
def test_refinement_stops_at_once_where_every_step_overfits(case, kind):
    """Forced overfitting: the training pixels are noise, the held-out ones the slices. The held-out error is
    smallest before the first step, so the split stops after ``patience`` worse evaluations and keeps 0 steps."""
    data, motion, s, field = case
    field = GaussianField.from_state(field.state())
    train, test = _split(data)
    noisy, held = _quadratures(kind, data, motion, s, train, test, torch.ones(data.n_pixels))
    noisy.y = torch.rand(len(train), generator=torch.Generator().manual_seed(0)) * 2
    evaluations = []
    cfg = RefineConfig(max_steps=20, every=2, patience=2)
    best = refine_field(field, noisy, cfg, MODEL, k=MODEL.k_neighbors, steps=cfg.max_steps, held=held,
                        on_held=lambda step, e: evaluations.append((step, e)))
    assert best == 0
    assert [step for step, _ in evaluations] == [0, 2, 4]  # two evaluations without a new minimum, then stop
    assert evaluations[1][1] > evaluations[0][1] and evaluations[2][1] > evaluations[0][1]
    if kind == "grid":  # the last evaluation kept parts for a step that did not follow: let go of
        assert held.voxels._parts is None


def test_a_held_out_evaluation_and_the_training_step_after_it_evaluate_the_field_once(case, monkeypatch):
    """Through the grid, the held-out and training quadratures share the voxels: the held-out evaluation before a step
    keeps what the step's gradient needs, so the field is evaluated once per step (and once more at the last
    evaluation, which no step follows), and the refinement is the same to the bit as when every evaluation computes
    the field again."""
    import gsvr.recon.refine as refine_module
    data, motion, s, field = case
    model = dataclasses.replace(MODEL, chunk_pixels=256)
    train, test = _split(data)
    cfg = RefineConfig(max_steps=4, every=2, patience=10)
    calls = [0]
    parts = refine_module.gaussian_sum_parts

    def counted(*args, **kwargs):
        calls[0] += 1
        return parts(*args, **kwargs)

    monkeypatch.setattr(refine_module, "gaussian_sum_parts", counted)

    def run():
        f = GaussianField.from_state(field.state())
        fit, held = _quadratures("grid", data, motion, s, train, test, torch.ones(data.n_pixels))
        calls[0] = 0
        errors = []
        refine_field(f, fit, cfg, model, k=model.k_neighbors, steps=cfg.max_steps, held=held,
                     on_held=lambda step, e: errors.append(e))
        assert held.voxels._parts is None
        return f, errors, calls[0] // -(-len(held.voxels.points) // model.chunk_pixels)

    kept, kept_errors, kept_evaluations = run()
    error = GridQuadrature.error
    monkeypatch.setattr(GridQuadrature, "error", lambda self, *a, keep=False, **kw: error(self, *a, **kw))
    again, again_errors, again_evaluations = run()
    assert (kept_evaluations, again_evaluations) == (4 + 1, 4 + 3)  # steps (+ the last evaluation), steps + evaluations
    assert kept_errors == again_errors
    for a, b in zip(kept.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["grid", "nodes"])
def test_refinement_runs_on_while_the_held_out_error_falls(case, kind):
    """A field with its intensities halved: the steps on the training slices mend the held-out ones too."""
    data, motion, s, field = case
    field = GaussianField.from_state(field.state())
    with torch.no_grad():
        field.values.mul_(0.5)
    train, test = _split(data)
    fit, held = _quadratures(kind, data, motion, s, train, test, torch.ones(data.n_pixels))
    evaluations = []
    cfg = RefineConfig(max_steps=8, every=2, patience=2)
    best = refine_field(field, fit, cfg, MODEL, k=MODEL.k_neighbors, steps=cfg.max_steps, held=held,
                        on_held=lambda step, e: evaluations.append(e))
    assert best == 8
    assert all(b < a for a, b in zip(evaluations, evaluations[1:]))


def test_the_field_on_the_grid_is_its_sum_at_the_supported_voxels_and_zero_beyond(case):
    data, _, _, field = case
    grid, covered = _grid(data)
    pts = grid.points()[covered]
    nbr = knn(field.means.detach(), pts, MODEL.k_neighbors, backend="kdtree")
    want = torch.zeros(grid.shape)
    want[covered] = gaussian_sum(pts, nbr, field.tables(), mode=MODEL.render_mode, delta=MODEL.delta).detach()
    assert torch.allclose(field_on_grid(field, grid, covered, MODEL, MODEL.k_neighbors), want, atol=1e-5)


def test_registering_to_the_field_registers_to_it_sampled_on_the_grid_and_refits_the_scales(case):
    """Against an independent computation: the slices registered (the SVR cycles' registration) to the field summed at
    the support's voxels, then each slice's least-squares intensity scale to that volume at its new pose; and how far
    each slice turned. Slices start turned 2 deg and shifted 1 mm off the motion the field was built at, with intensity
    scales off by 10 %."""
    data, _, s, field = case
    g = torch.Generator().manual_seed(3)
    rotvec = torch.nn.functional.normalize(torch.randn(data.n_slices, 3, generator=g), dim=-1) * np.radians(2.0)
    trans = torch.nn.functional.normalize(torch.randn(data.n_slices, 3, generator=g), dim=-1)

    def displaced() -> SliceMotion:
        motion = SliceMotion(data.n_slices, "cpu")
        with torch.no_grad():
            motion.rotvec.copy_(rotvec)
            motion.trans.copy_(trans)
            motion.log_scale.copy_(torch.log(torch.where(torch.arange(data.n_slices) % 2 == 0, 1.1, 0.9)))
        return motion

    grid, covered = _grid(data)
    motion = displaced()
    ncc, turned = register_to_field(field, grid, covered, data, motion, s, MODEL, MODEL.k_neighbors)

    pts = grid.points()[covered]
    nbr = knn(field.means.detach(), pts, MODEL.k_neighbors, backend=MODEL.knn_backend)
    volume = torch.zeros(grid.shape)
    volume[covered] = gaussian_sum(pts, nbr, field.tables(), mode=MODEL.render_mode, delta=MODEL.delta).detach()
    want = displaced()
    want_ncc = register(volume, grid, data, want, s)
    pred = SliceOperator(data, want, grid, s, torch.arange(data.n_pixels)).forward(volume)
    m = data.n_slices
    py = torch.zeros(m).index_add(0, data.slice_idx, pred * data.y)
    pp = torch.zeros(m).index_add(0, data.slice_idx, pred * pred)
    want_scale = (py / pp).clamp(*s.scale_bounds)

    # (float32 rounding of the two Gaussian sums, carried through ten Gauss-Newton steps: ~1e-4; the slices moved 3e-2
    # rad and 1 mm)
    assert torch.allclose(ncc, want_ncc, atol=1e-3)
    assert torch.allclose(motion.rotvec, want.rotvec, atol=1e-3) and torch.allclose(motion.trans, want.trans, atol=1e-2)
    assert torch.allclose(torch.exp(motion.log_scale.detach()), want_scale, rtol=2e-3)
    start = axis_angle_to_matrix(rotvec)
    assert torch.allclose(turned, matrix_to_axis_angle(motion.rotation().detach() @ start.transpose(-1, -2)).norm(dim=-1),
                          atol=1e-5)
    assert float(turned.median()) > np.radians(0.5)  # the slices did move


SIM = dict(inplane_spacing_mm=1.6, thickness_mm=4.0, noise_level=0.01, fov_margin_mm=4.0, through_plane_samples=11)
TINY = {"init": {"n_gaussians": 3000}, "model": {"k_neighbors": 12, "knn_every": 5}, "output": {"resolution_mm": 1.6},
        "svr": {"spacings_mm": [3.2, 2.4, 2.4]}, "align": None, "fit": {"steps": 20}}


@pytest.mark.slow
def test_the_stage_brings_the_volume_closer_to_the_truth_than_the_fit_alone(small_subject, monkeypatch):
    vol, mask, affine = small_subject
    sim = simulate_stacks(vol, mask, affine, SimulationConfig(motion_rotation_deg=3.0, motion_translation_mm=2.0, seed=4, **SIM))
    grids = []  # the grid of each refinement of all slices: the first, then one per registration round
    all_pixels_voxels = refine_stage.all_pixels_voxels
    monkeypatch.setattr(refine_stage, "all_pixels_voxels",
                        lambda grid, covered, on_grid: grids.append(grid) or all_pixels_voxels(grid, covered, on_grid))
    psnr = {}
    for refine in (None, {"max_steps": 12}):
        result = reconstruct(stacks_from_simulation(sim), ReconConfig.from_dict({**TINY, "refine": refine}), progress=False)
        psnr[bool(refine)] = evaluate_volume(result.volume.data, result.volume.affine, vol, affine, mask).psnr
        if refine:
            history = result.history
            assert (history.stage == "refine_holdout").any() and (history.stage == "refine").any()
            steps = int((history.stage == "refine").sum())  # the registration rounds: 3 of at most 6 steps
            assert (history.stage == "refine_register").sum() == 3 * min(6, steps)
            # the last round refined the output's own grid (built from the final motions), not the cycles' one
            assert len(grids) == 4 and grids[0].corner_mm != grids[-1].corner_mm
            assert tuple(grids[-1].shape) == result.volume.data.shape
            np.testing.assert_allclose(np.asarray(grids[-1].corner_mm) + result.model["origin_mm"],
                                       result.volume.affine[:3, 3], atol=1e-4)
    assert psnr[True] > psnr[False] + 0.3, psnr


def test_the_rounds_refine_the_grid_and_support_of_the_volume_the_output_samples(case):
    """After a registration the rounds refine on ``output_support`` at the new motions: the grid and the support of
    the volume the sample stage writes from those motions (an independent construction: its own grid, its own
    nearest-pixel test), so the voxels refined are the voxels written."""
    data, _, _, field = case
    gen = torch.Generator().manual_seed(3)
    motion = SliceMotion(data.n_slices, "cpu")
    with torch.no_grad():
        motion.rotvec.copy_(0.05 * torch.randn(data.n_slices, 3, generator=gen))
        motion.trans.copy_(torch.randn(data.n_slices, 3, generator=gen))
    grid, covered = output_support(data, motion, 2.4, 6.0)
    model = {"field": field.state(), "origin_mm": np.zeros(3), "intensity_scale": 1.0,
             "support_points": current_positions(data, motion), "support_radius_mm": 6.0,
             "config": ReconConfig().to_dict()}
    out = sample_volume(model, resolution_mm=2.4)
    assert out.data.shape == tuple(grid.shape)
    np.testing.assert_allclose(out.affine[:3, 3], grid.corner_mm, atol=1e-4)
    written = torch.from_numpy(out.data != 0)
    assert not (written & ~covered).any()
    assert int(written.sum()) >= 0.95 * int(covered.sum())
    # a motion that moved the pixels moved the grid: the one from the identity motion is not it
    assert VoxelGrid.covering(data.x0, 2.4, 6.0).corner_mm != grid.corner_mm
