"""3DGS density control in the joint stage: clone, split and prune by mean position gradient."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from gsvr.model.densify import densify_and_prune
from gsvr.recon.config import DensifyConfig
from gsvr.recon.strategies.base import Strategy

if TYPE_CHECKING:
    from gsvr.recon.stages.joint import JointLoop

log = logging.getLogger(__name__)


class Densify(Strategy):
    """Every ``cfg.every`` steps (up to ``cfg.until``, else the phase's last step) the Gaussians with the largest
    mean position gradient since the last control are cloned or split and the faintest pruned."""

    def __init__(self, cfg: DensifyConfig, n_gaussians: int, steps: int, device: torch.device) -> None:
        self.cfg = cfg
        self.last_step = cfg.until or steps
        self.grad = torch.zeros(n_gaussians, device=device)  # [N] summed |d loss / d mean|
        self.count = 0

    def step_pre(self, it: int, loop: "JointLoop") -> bool:
        if not (it > 0 and it % self.cfg.every == 0 and it <= self.last_step and self.count):
            return False
        new_field, stats = densify_and_prune(
            loop.field, self.grad / self.count, fraction=self.cfg.fraction, split_scale_mm=self.cfg.split_scale_mm,
            prune_fraction=self.cfg.prune_fraction, max_gaussians=self.cfg.max_gaussians, generator=loop.gen)
        loop.swap_field(new_field, it)
        log.info("density control at step %d: %d cloned, %d split, %d pruned -> %d Gaussians",
                 it, stats.cloned, stats.split, stats.pruned, loop.field.n)
        return True

    def step_post_backward(self, it: int, loop: "JointLoop") -> None:
        if loop.field.means.grad is not None:
            self.grad += loop.field.means.grad.detach().norm(dim=-1)
            self.count += 1

    def field_replaced(self, loop: "JointLoop") -> None:
        self.grad = torch.zeros(loop.field.n, device=loop.field.means.device)
        self.count = 0

    def state_dict(self) -> dict:
        return {"density": {"grad": self.grad, "count": self.count}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("density"):
            self.grad, self.count = state["density"]["grad"].to(self.grad.device), state["density"]["count"]
