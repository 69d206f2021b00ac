"""The slice forward model: two-stage rendering against the plain reference, values and gradients."""

import numpy as np
import pytest
import torch

from gsvr.io.nifti import Stack
from gsvr.model.field import GaussianField
from gsvr.ops.gaussians import render_reference
from gsvr.recon.config import ModelConfig
from gsvr.recon.forward import Neighbours, current_positions, render_slices
from gsvr.recon.slices import SliceMotion, build_slice_data, transform_points


def _case(mode: str, intensity: str = "linear"):
    rng = np.random.default_rng(0)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    affine[:3, 3] = [-9.0, -9.0, -4.5]
    stack = Stack(data=rng.random((12, 12, 4)).astype(np.float32), mask=np.ones((12, 12, 4), bool), affine=affine,
                  thickness_mm=3.0, name="s")
    data = build_slice_data([stack], quantile=0.99, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    n = 60
    field = GaussianField(torch.rand(n, 3, generator=g) * 18 - 9, torch.log(1.0 + torch.rand(n, 3, generator=g)),
                          torch.randn(n, 4, generator=g), torch.rand(n, generator=g), mode=mode, intensity=intensity)
    motion = SliceMotion(data.n_slices, torch.device("cpu"))
    with torch.no_grad():
        motion.rotvec.copy_(0.05 * torch.randn(data.n_slices, 3, generator=g))
        motion.trans.copy_(torch.randn(data.n_slices, 3, generator=g))
        motion.log_scale.copy_(0.1 * torch.randn(data.n_slices, generator=g))
    return data, field, motion


@pytest.mark.parametrize("mode, intensity", [("exact", "linear"), ("normalized", "linear"), ("normalized", "softplus")])
def test_two_stage_rendering_matches_the_reference_in_values_and_gradients(mode, intensity):
    data, field, motion = _case(mode, intensity)
    model = ModelConfig(k_neighbors=8, render_mode=mode, knn_backend="torch")
    nbrs = Neighbours(None)
    nbrs.refresh(current_positions(data, motion), data.slice_idx, field.means, 8, "torch")
    render = render_slices(field, motion, data, nbrs, model=model, motion_on=True)
    half = data.n_pixels // 2
    loss = sum((render.predict(sel) * torch.arange(len(data.y))[sel]).sum() for sel in (slice(0, half), slice(half, None)))
    loss.backward()
    render.backward()
    got = [t.grad.clone() for t in (field.means, field.values, motion.rotvec, motion.trans, motion.log_scale)]
    for t in (field.means, field.values, motion.rotvec, motion.trans, motion.log_scale):
        t.grad = None

    gauss = nbrs.pair_gauss[nbrs.nbr_pair]  # [P, K] the Gaussian behind each pixel's neighbour
    x = transform_points(data.x0, data.slice_idx, data.centre, motion.rotation(), motion.trans)
    ref = render_reference(x, data.slice_idx, gauss, field.means, field.log_scales, field.quats, field.intensities,
                           motion.psf_cov(data, motion.rotation()), mode=mode, delta=model.delta)
    ref = ref * torch.exp(motion.log_scale)[data.slice_idx]
    (ref * torch.arange(len(data.y))).sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(render.predict(slice(None)), ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(got, (field.means.grad, field.values.grad, motion.rotvec.grad, motion.trans.grad, motion.log_scale.grad)):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def test_frozen_motion_gets_no_gradient_and_a_residual_adds_to_the_intensities():
    data, field, motion = _case("exact")
    model = ModelConfig(k_neighbors=8, knn_backend="torch")
    nbrs = Neighbours(None)
    nbrs.refresh(current_positions(data, motion), data.slice_idx, field.means, 8, "torch")
    render = render_slices(field, motion, data, nbrs, model=model, motion_on=False)
    render.predict(slice(None)).sum().backward()
    render.backward()
    assert motion.rotvec.grad is None and motion.trans.grad is None and motion.log_scale.grad is not None
    with torch.no_grad():
        base = render.predict(slice(None))
        shifted = render_slices(field, motion, data, nbrs, model=model, motion_on=False,
                                residual=lambda means: torch.ones(len(means))).predict(slice(None))
        plus_one = GaussianField(field.means, field.log_scales, field.quats, field.values + 1, mode="exact")
        expected = render_slices(plus_one, motion, data, nbrs, model=model, motion_on=False).predict(slice(None))
    torch.testing.assert_close(shifted, expected)
    assert not torch.allclose(shifted, base)
