"""The hooks a joint-stage strategy may implement; the loop calls them in this order each step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from torch import Tensor

if TYPE_CHECKING:
    from gsvr.recon.stages.joint import JointLoop


class Strategy:
    """A component of the joint stage. Every hook is optional (the defaults do nothing)."""

    def param_groups(self) -> list[dict]:
        """Optimiser parameter groups the strategy trains (placed before the field's)."""
        return []

    def step_pre(self, it: int, loop: "JointLoop") -> bool:
        """Before step ``it`` (neighbours not yet refreshed); True when it replaced the field's Gaussians."""
        return False

    def residual(self, it: int, loop: "JointLoop") -> Callable[[Tensor], Tensor] | None:
        """A residual on the intensities for step ``it`` (means [N, 3] -> [N]), or None."""
        return None

    def step_post_backward(self, it: int, loop: "JointLoop") -> None:
        """After the backward pass of step ``it``, before the optimiser step."""

    def field_replaced(self, loop: "JointLoop") -> None:
        """The field's Gaussians were replaced (by this or another strategy)."""

    def finish(self, loop: "JointLoop") -> None:
        """After the last step of the phase."""

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume the strategy (merged into the joint checkpoint)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Resume from a joint checkpoint."""
