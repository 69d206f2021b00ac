"""``reconstruct``: the stages of :mod:`gsvr.recon.stages` run in order, driven by the checkpointer."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Sequence

import pandas as pd
import torch

from gsvr.io.nifti import Stack
from gsvr.preprocess.stacks import dilate_masks_inplane
from gsvr.recon.checkpoint import Checkpointer
from gsvr.recon.config import ReconConfig
from gsvr.recon.stages import PIPELINE, align, prepare
from gsvr.recon.state import HISTORY_COLUMNS, STAGE_MEASURES, ReconState, Result, resolve_device

log = logging.getLogger(__name__)

__all__ = ["HISTORY_COLUMNS", "STAGE_MEASURES", "Result", "deterministic", "prepare_stacks", "reconstruct", "resolve_device"]


def reconstruct(stacks: Sequence[Stack], config: ReconConfig | None = None, *, progress: bool = True,
                checkpoint: str | None = None, resume: bool = False, initial_motion: pd.DataFrame | None = None) -> Result:
    """Reconstruct a volume from motion-corrupted stacks (bit-reproducible for a seed on CPU).

    Args:
        stacks: loaded stacks with masks and thicknesses (see :func:`gsvr.io.load_stacks`).
        config: settings; defaults when None.
        progress: show a tqdm progress bar.
        checkpoint: write checkpoints to this file (see :mod:`gsvr.recon.checkpoint`); removed on success.
        resume: continue from ``checkpoint`` when it exists (same result as an uninterrupted run).
        initial_motion: start the slice motions from this slice table (``slices.tsv`` format: an earlier
            run's, or known motions) instead of the headers.
    """
    cfg = config or ReconConfig()
    ck = Checkpointer(checkpoint, cfg.run.checkpoint_every or 0, cfg.model.knn_every, resume=resume,
                      stages=[stage.NAME for stage, _ in PIPELINE])
    with deterministic():
        state = ReconState(cfg=cfg, ck=ck, stacks=list(stacks), progress=progress, device=resolve_device(cfg.run.device),
                           initial_motion=initial_motion)
        for stage, section in PIPELINE:
            t0 = time.perf_counter()
            state = stage.run(state, getattr(cfg, section))
            log.info("stage %s done in %.1f s", stage.NAME, time.perf_counter() - t0)
    ck.finish()
    return state.result


def prepare_stacks(stacks: Sequence[Stack], cfg: ReconConfig) -> list[Stack]:
    """The prepare and align stages, and the masks grown as the slices stage grows them (for the baselines)."""
    aligned = align.align(prepare.prepare(stacks, cfg.preprocess), cfg.align, motion=cfg.motion, seed=cfg.run.seed,
                          mask_dilation_mm=cfg.preprocess.mask_dilation_mm)
    return dilate_masks_inplane(aligned, cfg.preprocess.mask_dilation_mm)


@contextlib.contextmanager
def deterministic():
    """Torch deterministic algorithms inside the block (CPU scatter-adds otherwise vary in order)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
