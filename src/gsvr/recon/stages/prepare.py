"""Stage prepare: crop the stacks to their masks, standardise, optionally N4-correct; check they overlap."""

from __future__ import annotations

import itertools
import warnings
from typing import Sequence

import numpy as np

from gsvr.errors import GsvrError
from gsvr.io.nifti import Stack
from gsvr.preprocess import PreprocessConfig, preprocess_stacks
from gsvr.recon.state import ReconState

NAME = "prepare"


def run(state: ReconState, cfg: PreprocessConfig) -> ReconState:
    state.stacks = prepare(state.stacks, cfg)
    return state


def prepare(stacks: Sequence[Stack], cfg: PreprocessConfig) -> list[Stack]:
    """The preprocessed stacks; slice indices stay those of the input stacks."""
    if len(stacks) == 1:
        warnings.warn(f"{stacks[0].label}: a single stack cannot resolve its own through-plane detail or slice motion "
                      "along its slice normal; the volume is a motion-corrected super-resolution of one stack "
                      "(acquire at least 2, better 3 orthogonal stacks)", stacklevel=3)
    out = preprocess_stacks(stacks, cfg, drop_empty_slices=False)
    check_overlap(out)  # in scanner space: the head turns between stacks, it does not leave the field of view
    return out


def check_overlap(stacks: Sequence[Stack]) -> None:
    """Every stack's mask must overlap the others' (world bounding boxes, one slice thickness of slack)."""
    if len(stacks) < 2:
        return
    boxes = []
    for s in stacks:
        ijk = np.argwhere(s.mask)
        lo, hi = ijk.min(0), ijk.max(0)
        corners = np.array(list(itertools.product(*zip(lo, hi))), dtype=np.float64)  # [8, 3]
        world = corners @ s.affine[:3, :3].T + s.affine[:3, 3]
        slack = max(s.thickness_mm, float(s.spacing_mm[2]))
        boxes.append((world.min(0) - slack, world.max(0) + slack))
    for i, (lo, hi) in enumerate(boxes):
        others = [b for j, b in enumerate(boxes) if j != i]
        if not any(np.all(lo <= o_hi) and np.all(o_lo <= hi) for o_lo, o_hi in others):
            raise GsvrError(f"{stacks[i].label}: its mask does not overlap any other stack's mask in world space "
                            "(wrong header, wrong mask, or a stack of another subject)")
