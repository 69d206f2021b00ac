"""The residual-field strategy: its switch-on step, its parameters and the bake at the end."""

from types import SimpleNamespace

import torch

from gsvr.model.field import GaussianField
from gsvr.recon.config import ResidualFieldConfig
from gsvr.recon.strategies import ResidualFieldStrategy


def _field(n: int = 30) -> GaussianField:
    g = torch.Generator().manual_seed(1)
    return GaussianField(torch.rand(n, 3, generator=g) * 30, torch.zeros(n, 3), torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
                         torch.rand(n, generator=g), mode="exact")


def test_the_residual_is_off_before_its_start_step_and_trained_with_its_own_learning_rate():
    field = _field()
    s = ResidualFieldStrategy(ResidualFieldConfig(start=5, lr=3e-3), field, steps=10)
    loop = SimpleNamespace(field=field)
    assert s.residual(4, loop) is None and s.residual(5, loop) is s.nrf
    groups = s.param_groups()
    assert len(groups) == 1 and groups[0]["lr"] == 3e-3
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in s.nrf.parameters()}


def test_finish_bakes_the_residual_into_the_values_only_when_it_was_on():
    field = _field()
    s = ResidualFieldStrategy(ResidualFieldConfig(start=0, bound=0.5), field, steps=3)
    torch.nn.init.constant_(s.nrf.head.bias, 1.0)  # a non-zero residual
    expected = field.values.detach() + s.nrf(field.means).detach()
    assert not torch.allclose(expected, field.values.detach())
    s.finish(SimpleNamespace(field=field))
    torch.testing.assert_close(field.values.detach(), expected)
    late = ResidualFieldStrategy(ResidualFieldConfig(start=3), field, steps=3)  # never switched on
    torch.nn.init.constant_(late.nrf.head.bias, 1.0)
    before = field.values.detach().clone()
    late.finish(SimpleNamespace(field=field))
    assert torch.equal(field.values.detach(), before)


def test_its_state_round_trips_including_the_extent_it_was_built_for():
    """A resumed phase rebuilds the strategy around the checkpoint's field, whose extent differs from the one
    the phase started with: the encoding must stay that of the start."""
    field = _field()
    a = ResidualFieldStrategy(ResidualFieldConfig(), field, steps=3)
    moved = GaussianField(field.means * 1.5, field.log_scales, field.quats, field.values, mode="exact")
    b = ResidualFieldStrategy(ResidualFieldConfig(), moved, steps=3)
    torch.nn.init.constant_(a.nrf.head.bias, 0.3)
    torch.nn.init.normal_(a.nrf.body[0].weight)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.nrf(field.means), a.nrf(field.means))
