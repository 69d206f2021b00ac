"""M-Gaussian's neural residual field in the joint stage: a bounded MLP residual on the intensities, baked
into the Gaussians' values at the end (the result is a plain Gaussian field again)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gsvr.model.field import GaussianField
from gsvr.model.residual import ResidualField
from gsvr.recon.config import ResidualFieldConfig
from gsvr.recon.strategies.base import Strategy

if TYPE_CHECKING:
    from gsvr.recon.stages.joint import JointLoop


class ResidualFieldStrategy(Strategy):
    """The residual field, trained from step ``cfg.start`` on, over the field's extent at the phase's start."""

    def __init__(self, cfg: ResidualFieldConfig, field: GaussianField, steps: int) -> None:
        self.cfg = cfg
        self.steps = steps
        with torch.no_grad():
            extent = float((field.means - field.means.mean(0)).abs().max().clamp_min(1.0))
        self.nrf = ResidualField(bands=cfg.bands, hidden=cfg.hidden, layers=cfg.layers, bound=cfg.bound,
                                 extent_mm=extent).to(field.means.device)

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.nrf.parameters()), "lr": self.cfg.lr}]

    def residual(self, it: int, loop: "JointLoop") -> ResidualField | None:
        return self.nrf if it >= self.cfg.start else None

    def finish(self, loop: "JointLoop") -> None:
        if self.steps > self.cfg.start:
            self.nrf.bake(loop.field.means.detach(), loop.field.values.data)

    def state_dict(self) -> dict:
        return {"nrf": self.nrf.state_dict(), "nrf_extent_mm": self.nrf.extent_mm}

    def load_state_dict(self, state: dict) -> None:
        self.nrf.load_state_dict(state["nrf"])
        self.nrf.extent_mm = state["nrf_extent_mm"]  # of the field when the phase started, not at the checkpoint
