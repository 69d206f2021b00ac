"""The Gaussian field: parameters, state round trip, sampling, content-adaptive initialisation."""

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from gsvr.model.field import GaussianField, content_adaptive_init


def _field(n=50, mode="exact", seed=0):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * 20
    log_scales = torch.log(0.8 + torch.rand(n, 3, generator=g))
    quats = torch.randn(n, 4, generator=g)
    values = 0.5 + torch.rand(n, generator=g)
    return GaussianField(means, log_scales, quats, values, mode=mode)


def _one(mean, scales, quat, value, mode):
    return GaussianField(torch.tensor([mean], dtype=torch.float32), torch.log(torch.tensor([scales])),
                         torch.tensor([quat]), torch.tensor([value]), mode=mode)


@pytest.mark.parametrize("mode", ["exact", "normalized"])
def test_the_state_round_trip_gives_the_same_parameters_and_samples(mode):
    field = _field(mode=mode)
    again = GaussianField.from_state(field.state())
    assert again.mode == mode and again.n == field.n
    for name in ("means", "log_scales", "quats", "values"):
        assert isinstance(getattr(again, name), nn.Parameter)
        assert torch.equal(getattr(again, name), getattr(field, name)), name
    pts = (torch.rand(500, 3, generator=torch.Generator().manual_seed(1)) - 0.5) * 20
    assert torch.equal(again.sample(pts, k=16), field.sample(pts, k=16))
    with torch.no_grad():  # a snapshot: a step on the copy leaves the field it came from as it was
        again.values.add_(1.0)
        again.means.add_(1.0)
    assert not torch.equal(again.values, field.values) and not torch.equal(again.means, field.means)


def test_the_state_is_detached_on_the_cpu_and_float32():
    field = _field()
    state = field.state()
    assert set(state) == {"means", "log_scales", "quats", "values", "mode", "intensity"}
    for name in ("means", "log_scales", "quats", "values"):
        t = state[name]
        assert not t.requires_grad and t.device.type == "cpu" and t.dtype == torch.float32
    double = GaussianField(*(state[k].double() for k in ("means", "log_scales", "quats", "values")), mode="exact")
    assert double.means.dtype == torch.float32  # parameters are float32 whatever comes in


@pytest.mark.parametrize("mode", ["exact", "normalized"])
def test_a_single_isotropic_gaussian_samples_to_its_analytic_value(mode):
    c, sigma, delta = 1.7, 1.5, 1e-4
    field = _one([2.0, -1.0, 3.0], [sigma] * 3, [1.0, 0.0, 0.0, 0.0], c, mode)
    offsets = torch.tensor([[0.0, 0.0, 0.0], [sigma, 0.0, 0.0], [0.0, -2 * sigma, 0.0], [1.0, 1.0, 1.0]])
    pts = torch.tensor([[2.0, -1.0, 3.0]]) + offsets
    w = torch.exp(-0.5 * (offsets ** 2).sum(-1) / sigma ** 2)
    expected = c * w if mode == "exact" else c * w / (w + delta)
    got = field.sample(pts, k=1, delta=delta)
    assert_close(got, expected, rtol=1e-6, atol=1e-7)
    # At the mean: the value itself (exact), c / (1 + delta) (normalized).
    assert_close(got[0], torch.tensor(c if mode == "exact" else c / (1 + delta)), rtol=1e-6, atol=0.0)


def test_the_quaternion_is_w_first_and_normalised_when_sampling():
    # Standard deviations (1, 3, 1) turned 90 degrees about z: the long axis now lies along world x.
    half = math.pi / 4
    field = _one([0.0, 0.0, 0.0], [1.0, 3.0, 1.0], [2.7 * math.cos(half), 0.0, 0.0, 2.7 * math.sin(half)], 1.0, "exact")
    got = field.sample(torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]), k=1)
    assert_close(got, torch.tensor([math.exp(-0.5), math.exp(-4.5), math.exp(-0.5)]), rtol=1e-5, atol=1e-7)


def test_sampling_sums_the_k_nearest_gaussians():
    # Two unit Gaussians 4 mm apart: with k=2 both count, with k=1 only the nearer one.
    field = GaussianField(torch.tensor([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0]]), torch.zeros(2, 3), torch.tensor([[1.0, 0, 0, 0]] * 2),
                          torch.tensor([1.0, 2.0]), mode="exact")
    pts = torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    near, far = math.exp(-0.5), math.exp(-4.5)
    assert_close(field.sample(pts, k=2), torch.tensor([near + 2 * far, far + 2 * near]), rtol=1e-6, atol=1e-7)
    assert_close(field.sample(pts, k=1), torch.tensor([near, 2 * near]), rtol=1e-6, atol=1e-7)
    # Chunks do not change the result; k beyond N is clamped.
    assert torch.equal(field.sample(pts, k=5, chunk=1), field.sample(pts, k=2))


def test_replace_with_takes_over_the_other_gaussians_as_new_registered_parameters():
    field, other = _field(n=30), _field(n=45, seed=3)
    old = dict(field.named_parameters())
    field.replace_with(other)
    assert field.n == 45
    params = dict(field.named_parameters())
    assert set(params) == {"means", "log_scales", "quats", "values"}
    for name, p in params.items():
        assert isinstance(p, nn.Parameter) and p.requires_grad
        assert p is not old[name] and p is not getattr(other, name)  # new Parameters: the number may change
        assert torch.equal(p, getattr(other, name)), name
    before = field.means.detach().clone()
    with torch.no_grad():
        other.means.add_(1.0)  # a copy: changing the other field leaves this one alone
    assert torch.equal(field.means, before) and not torch.equal(field.means, other.means)


def _two_halves(grad_left, grad_right, size=20):
    """Pixels on a 1 mm grid in two separated halves (x < 0 and x > 0) of equal size."""
    i, j = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    plane = torch.stack([i.flatten(), j.flatten(), torch.zeros(size * size)], -1)
    positions = torch.cat([plane - torch.tensor([size + 5.0, 0, 0]), plane + torch.tensor([5.0, 0, 0])])
    grad = torch.cat([torch.full((size * size,), grad_left), torch.full((size * size,), grad_right)])
    values = torch.cat([torch.full((size * size,), 0.25), torch.full((size * size,), 0.75)])
    return positions, values, grad, torch.full_like(positions, 0.5)


def _init(positions, values, grad, jitter, *, lambda_init, seed=0, n=3000, mode="normalized"):
    return content_adaptive_init(positions, values, grad, jitter, n=n, lambda_init=lambda_init, mode=mode, k=8,
                                 scale_bounds_mm=(0.3, 2.0), generator=torch.Generator().manual_seed(seed))


def test_content_adaptive_init_draws_gaussians_in_proportion_to_the_gradient():
    positions, values, grad, jitter = _two_halves(9.0, 1.0)
    field = _init(positions, values, grad, jitter, lambda_init=0.0)
    left = field.means[:, 0] < 0
    # P ~ |grad|: 9 / (9 + 1) of the draws on the left (binomial sd 0.0055 for 3000 draws).
    assert abs(float(left.float().mean()) - 0.9) < 0.03
    # Each Gaussian carries its pixel's value and stays within its pixel's footprint.
    assert_close(field.values.detach(), torch.where(left, 0.25, 0.75))
    nearest = torch.cdist(field.means.detach(), positions).argmin(1)
    assert ((field.means - positions[nearest]).abs() <= jitter[nearest] + 1e-6).all()
    # Isotropic, clamped scales; identity rotations.
    scales = torch.exp(field.log_scales.detach())
    assert torch.equal(scales[:, 0], scales[:, 1]) and torch.equal(scales[:, 0], scales[:, 2])
    assert scales.min() >= 0.3 - 1e-6 and scales.max() <= 2.0 + 1e-6
    assert torch.equal(field.quats.detach(), torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(field.n, 4))
    # lambda = 1: uniform over the pixels, whatever the gradient.
    uniform = _init(positions, values, grad, jitter, lambda_init=1.0)
    assert abs(float((uniform.means[:, 0] < 0).float().mean()) - 0.5) < 0.04


def test_content_adaptive_init_is_reproducible_with_the_generator():
    positions, values, grad, jitter = _two_halves(3.0, 1.0)
    a = _init(positions, values, grad, jitter, lambda_init=0.2, seed=7, n=500)
    b = _init(positions, values, grad, jitter, lambda_init=0.2, seed=7, n=500)
    c = _init(positions, values, grad, jitter, lambda_init=0.2, seed=8, n=500)
    for name in ("means", "log_scales", "quats", "values"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.means, c.means)


def test_exact_mode_init_divides_by_the_overlap_so_the_field_reproduces_the_pixels():
    """A flat image (all 0.5): the initial exact-mode field sampled at its means is about 0.5, not 0.5 x overlap."""
    positions, _, grad, jitter = _two_halves(1.0, 1.0)
    values = torch.full((len(positions),), 0.5)
    exact = _init(positions, values, grad, jitter, lambda_init=0.0, n=600, mode="exact")
    plain = _init(positions, values, grad, jitter, lambda_init=0.0, n=600, mode="normalized")
    assert torch.equal(exact.means, plain.means)  # same draws
    at_means = exact.sample(exact.means.detach(), k=8)
    uncorrected = GaussianField(plain.means, plain.log_scales, plain.quats, plain.values, mode="exact").sample(plain.means.detach(), k=8)
    assert float(uncorrected.median()) > 1.0  # the overlap the correction removes (about 4x here)
    assert abs(float(at_means.median()) - 0.5) < 0.1
    assert (exact.values <= plain.values + 1e-7).all()  # divided by an overlap of at least 1


def test_softplus_intensities_are_the_ones_given_and_survive_the_state_round_trip():
    base = _field(n=6, mode="normalized")
    wanted = torch.tensor([1e-3, 0.2, 1.0, 5.0, 30.0, 0.0])
    field = GaussianField.with_intensities(base.means, base.log_scales, base.quats, wanted, mode="normalized",
                                           intensity="softplus")
    assert_close(field.intensities, wanted.clamp_min(1e-6), rtol=1e-4, atol=1e-6)
    linear = GaussianField(base.means, base.log_scales, base.quats, wanted.clamp_min(1e-6), mode="normalized")
    pts = (torch.rand(200, 3, generator=torch.Generator().manual_seed(2)) - 0.5) * 20
    assert_close(field.sample(pts, k=6), linear.sample(pts, k=6), rtol=1e-4, atol=1e-6)  # it renders the intensities
    again = GaussianField.from_state(field.state())
    assert again.intensity == "softplus" and torch.equal(again.intensities, field.intensities)
