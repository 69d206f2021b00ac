"""Stage slices: the stacks become slice data (in-mask pixels, positions, normalised intensities) with
identity motion and unit weights; a checkpoint's shared state (motion, weights, log, generators) is restored."""

from __future__ import annotations

import logging

import torch

from gsvr.preprocess.stacks import dilate_masks_inplane
from gsvr.progress import progress_bar
from gsvr.recon.checkpoint import fingerprint
from gsvr.recon.config import ReconConfig, RunConfig
from gsvr.recon.slices import SliceMotion, build_slice_data, set_motion_from_table
from gsvr.recon.state import EVALUATIONS, ReconState

NAME = "slices"
log = logging.getLogger(__name__)


def run(state: ReconState, cfg: RunConfig) -> ReconState:
    ck, stacks, full = state.ck, state.stacks, state.cfg
    if ck.active:  # hashing the stacks costs time; only checkpointed runs need it
        ck.check(fingerprint(stacks, full.to_dict()))
    torch.manual_seed(cfg.seed)
    state.gen = torch.Generator().manual_seed(cfg.seed)
    # After the stack alignment (which grows them for its registrations only): the masks grown in plane
    # (preprocess.mask_dilation_mm)
    stacks = state.stacks = dilate_masks_inplane(stacks, full.preprocess.mask_dilation_mm)
    data = state.data = build_slice_data(stacks, quantile=full.preprocess.normalize_quantile, device=state.device)
    log.info("%d stacks, %d slices, %d in-mask pixels, %d Gaussians, K=%d, device %s", len(stacks), data.n_slices,
             data.n_pixels, min(full.init.n_gaussians, data.n_pixels), full.model.k_neighbors, state.device)
    state.motion = SliceMotion(data.n_slices, state.device)
    if state.initial_motion is not None:
        set_motion_from_table(data, state.motion, stacks, state.initial_motion)
    state.weights = torch.ones(data.n_slices, device=state.device)
    state.bar = progress_bar(total_steps(full, len(stacks)), desc="gsvr", unit="it", progress=state.progress)
    loaded = ck.loaded
    if loaded is not None:  # every checkpoint carries the state shared by all stages
        state.motion.load_state_dict(loaded["motion"])
        state.weights = loaded["weights"].to(state.device)
        state.history[:] = loaded["history"]
        state.gen.set_state(loaded["gen"])
        torch.set_rng_state(loaded["torch_rng"])
        state.t_start -= loaded["elapsed_s"]
        state.bar.update(sum(row[1] not in EVALUATIONS for row in state.history))
    return state


def total_steps(cfg: ReconConfig, n_stacks: int) -> int:
    """Steps of the progress bar: SVR cycles, fit steps, the refinement's (its split's fit and the most steps of
    both its refinements and of its registration rounds; the stage takes off those it does not run), coarse and
    full-resolution joint steps."""
    cycles = cfg.svr.n_cycles(n_stacks) if cfg.svr_cycles_run else 0
    fit = cfg.fit.steps if cfg.svr_cycles_run and cfg.init.from_svr and cfg.fit else 0
    refine = cfg.fit.steps + cfg.refine.most_steps() if cfg.refines else 0
    return cycles + fit + refine + (cfg.joint.multires.steps if cfg.joint.multires else 0) + cfg.joint.steps
