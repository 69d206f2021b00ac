"""The density-control strategy: when it acts, what it does to the field and its gradient statistics."""

from types import SimpleNamespace

import torch

from gsvr.model.field import GaussianField
from gsvr.recon.config import DensifyConfig
from gsvr.recon.strategies import Densify


def _loop(n: int = 40):
    gen = torch.Generator().manual_seed(0)
    means = torch.rand(n, 3, generator=gen) * 20
    field = GaussianField(means, torch.full((n, 3), 0.0), torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
                          torch.ones(n), mode="exact")
    loop = SimpleNamespace(field=field, gen=gen, swaps=[])
    loop.swap_field = lambda new, at: (loop.swaps.append(at), field.replace_with(new))
    return loop


def test_density_control_acts_every_n_steps_only_with_statistics_and_resets_them():
    loop = _loop()
    s = Densify(DensifyConfig(every=3, fraction=0.25, split_scale_mm=10.0, prune_fraction=0.0), loop.field.n, 10, "cpu")
    assert not s.step_pre(3, loop)  # no gradient statistics yet
    loop.field.means.grad = torch.zeros_like(loop.field.means)
    loop.field.means.grad[:5, 0] = 1.0  # five Gaussians with a large position gradient
    s.step_post_backward(0, loop)
    assert s.count == 1 and float(s.grad.sum()) == 5.0
    assert not s.step_pre(2, loop) and not s.step_pre(0, loop)
    assert s.step_pre(3, loop) and loop.swaps == [3]
    assert loop.field.n > 40  # the top quarter were cloned (scale 1 mm < split_scale_mm)
    s.field_replaced(loop)
    assert s.count == 0 and s.grad.shape == (loop.field.n,) and not s.grad.any()


def test_density_control_stops_after_its_last_step_and_round_trips_its_state():
    loop = _loop()
    s = Densify(DensifyConfig(every=2, until=3), loop.field.n, 10, "cpu")
    loop.field.means.grad = torch.ones_like(loop.field.means)
    s.step_post_backward(0, loop)
    assert not s.step_pre(4, loop)  # past ``until``
    other = Densify(DensifyConfig(every=2), loop.field.n, 10, "cpu")
    other.load_state_dict(s.state_dict())
    assert other.count == s.count and torch.equal(other.grad, s.grad)
