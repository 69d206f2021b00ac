"""Stage align: rigid stack-to-stack alignment (multi-start over rotations) to the reference stack."""

from __future__ import annotations

from typing import Sequence

from gsvr.io.nifti import Stack
from gsvr.preprocess.align import align_stacks
from gsvr.recon.config import AlignConfig
from gsvr.recon.state import ReconState

NAME = "align"


def run(state: ReconState, cfg: AlignConfig | None) -> ReconState:
    state.stacks = align(state.stacks, cfg, motion=state.cfg.motion, seed=state.cfg.run.seed,
                         mask_dilation_mm=state.cfg.preprocess.mask_dilation_mm)
    return state


def align(stacks: Sequence[Stack], cfg: AlignConfig | None, *, motion: bool, seed: int, mask_dilation_mm: float = 0.0) -> list[Stack]:
    """The stacks moved onto the reference stack; unchanged when alignment or motion is off, or for one stack.
    ``mask_dilation_mm``: the masks grown in plane for the registration, as the slices stage grows them."""
    if cfg is None or not motion or len(stacks) < 2:
        return list(stacks)
    out, _ = align_stacks(stacks, max_angle_deg=cfg.max_angle_deg, mask_dilation_mm=mask_dilation_mm, seed=seed)
    return out
