"""Stage refine: the fitted Gaussians refined on the slices through the voxel operator's PSF quadrature, by default on
the output grid (:mod:`gsvr.recon.refine`), for as many steps as held-out slices say pay off.

A hashed ``refine.holdout_fraction`` of the slices is held out; a second field is initialised and fitted, as the init
and fit stages do, to the output-grid super-resolution of the other slices, then refined on them until its error on
the held-out slices stops falling. The field of all slices is then refined for the step count of that split's
smallest held-out error (none when the first evaluation was the smallest). Then, when it was refined,
``refine.register_rounds`` rounds each register every slice to the refined field on the output grid, refit the slices'
intensity scales and refine a few more steps on the output grid and support rebuilt at the new motions, those the sample
stage writes unless the joint stage moves the slices again (the slice weights stay as the SVR cycles left them).
Checkpointed when it ends."""

from __future__ import annotations

import logging
import math

import torch

from gsvr.ops.voxel import VoxelGrid
from gsvr.recon.config import RefineConfig
from gsvr.recon.refine import (GridQuadrature, PsfQuadrature, VoxelNeighbours, holdout_slices, refine_field,
                               register_to_field)
from gsvr.recon.stages.fit import fit_to_volume
from gsvr.recon.stages.init import field_from_volume
from gsvr.recon.state import ReconState, log_peak_memory, support_radius
from gsvr.recon.svr import output_super_resolution, output_support

NAME = "refine"
log = logging.getLogger(__name__)


def run(state: ReconState, cfg: RefineConfig | None) -> ReconState:
    ck, full, data, bar = state.ck, state.cfg, state.data, state.bar
    if not full.refines:
        if cfg is not None:
            log.info("refine: not run (it refines content-adaptive Gaussians fitted to the output-grid super-resolution "
                     "after the SVR cycles)")
        return state
    if ck.skips(NAME) or ck.resumes(NAME):  # done before the checkpoint resumed from
        stages = [row[1] for row in state.history]
        settle_bar(state, cfg, split_steps=stages.count("refine_split"), steps=stages.count(NAME),
                   register_steps=stages.count("refine_register"))
        return state
    pixel_weight = state.weights[data.slice_idx] * state.pixel_weights
    held_slices = holdout_slices(data.n_slices, cfg.holdout_fraction)
    held = held_slices.to(pixel_weight.device)[data.slice_idx]
    if not held.any():  # a single slice: nothing to hold out
        log.info("refine: not run (it holds out slices, and there is one)")
        state.bar.total -= full.fit.steps + cfg.most_steps()
        return state
    bar.set_postfix_str("refine: super-resolution without the held-out slices")
    target = output_super_resolution(data, state.motion, pixel_weight * (~held).float(), full.svr, full.output.resolution_mm,
                                     support_radius(state.stacks))
    split = field_from_volume(target, state.covered, full.init, full.model, torch.Generator().manual_seed(full.run.seed),
                              n=state.field.n, k=state.k)

    def fit_step(step: int, loss: float, optimizer) -> None:
        state.record("refine_fit", loss)
        bar.update(1)
        bar.set_postfix_str(f"refine: fit to the split, loss {loss:.4f}")

    fit_to_volume(split, target, state.covered, full.fit, full.model, k=state.k, on_step=fit_step)
    done = [0]  # steps the split ran

    def split_step(step: int, loss: float) -> None:
        done[0] = step
        state.record("refine_split", loss)
        bar.update(1)

    def held_out(step: int, error: float) -> None:
        state.record("refine_holdout", error)
        bar.set_postfix_str(f"refine: split step {step}, held-out error {error:.3e}")

    grid = target.grid  # the output grid
    voxels = VoxelNeighbours(grid, state.covered) if cfg.sampling == "grid" else None
    steps = refine_field(split, quadrature(state, torch.nonzero(~held)[:, 0], pixel_weight, voxels), cfg, full.model,
                         k=state.k, steps=cfg.max_steps, on_step=split_step, on_held=held_out,
                         held=quadrature(state, torch.nonzero(held)[:, 0], pixel_weight, voxels, owns=False))
    del split, target
    log.info("refine: %d of %d slices held out; their error is smallest after %d steps of %d run",
             int(held_slices.sum()), data.n_slices, steps, done[0])
    on_grid = voxels is not None
    if on_grid:
        log.info("refine: the field evaluated at %d voxels of the output grid (%d in the support)", len(voxels.index),
                 int(voxels.covered.sum()))
    del voxels  # the split's neighbour table (and its scatter matrices) is not needed again
    settle_bar(state, cfg, split_steps=done[0], steps=steps, register_steps=cfg.round_steps(steps))

    def step_done(step: int, loss: float) -> None:
        state.record(NAME, loss)
        bar.update(1)
        bar.set_postfix_str(f"refine {step}/{steps}, slice error {loss:.3e}")

    pixels = torch.arange(data.n_pixels, device=pixel_weight.device)
    if steps:
        refine_field(state.field, quadrature(state, pixels, pixel_weight, all_pixels_voxels(grid, state.covered, on_grid)),
                     cfg, full.model, k=state.k, steps=steps, on_step=step_done)
    covered = state.covered
    for r in range(cfg.register_rounds if steps else 0):
        bar.set_postfix_str(f"refine: round {r + 1}/{cfg.register_rounds}, registering the slices to the field")
        ncc, turned = register_to_field(state.field, grid, covered, data, state.motion, full.svr, full.model, state.k)
        # the output grid and support at the new motions, as the sample stage will build them (unless the joint stage
        # moves the slices): what is refined next is the volume the output samples
        grid, covered = output_support(data, state.motion, full.output.resolution_mm, support_radius(state.stacks))
        log.info("refine: round %d: slices registered to the refined field, median NCC %.4f, rotation changed by %.2f deg "
                 "(median), %.2f deg (most)", r + 1, float(ncc.median()), math.degrees(float(turned.median())),
                 math.degrees(float(turned.max())))

        def round_step(step: int, loss: float) -> None:
            state.record("refine_register", loss)
            bar.update(1)
            bar.set_postfix_str(f"refine: round {r + 1}/{cfg.register_rounds}, slice error {loss:.3e}")

        refine_field(state.field, quadrature(state, pixels, pixel_weight, all_pixels_voxels(grid, covered, on_grid)), cfg,
                     full.model, k=state.k, steps=min(cfg.register_steps, steps), on_step=round_step)
    state.save(NAME, steps, field=state.field.state())
    log_peak_memory("the refinement on the slices")
    return state


def quadrature(state: ReconState, pixels: torch.Tensor, pixel_weight: torch.Tensor, voxels: VoxelNeighbours | None, *,
               owns: bool = True) -> PsfQuadrature | GridQuadrature:
    """The error of ``pixels``' prediction: through the output grid's ``voxels`` (``refine.sampling: grid``; a quadrature
    that does not ``own`` them shares the neighbours another rebuilds) or at the PSF nodes (``voxels`` None)."""
    if voxels is None:
        return PsfQuadrature(state.data, state.motion, state.cfg.svr, pixels, pixel_weight, psf=state.cfg.model.psf)
    return GridQuadrature(state.data, state.motion, state.cfg.svr, pixels, pixel_weight, voxels, owns=owns,
                          psf=state.cfg.model.psf)


def all_pixels_voxels(grid: VoxelGrid, covered: torch.Tensor, on_grid: bool) -> VoxelNeighbours | None:
    """The neighbour table of a quadrature of all pixels at the current motion: the voxels they see, on the output
    ``grid`` within its support ``covered`` (``on_grid``, ``refine.sampling: grid``), else None (the PSF-node render)."""
    return VoxelNeighbours(grid, covered) if on_grid else None


def settle_bar(state: ReconState, cfg: RefineConfig, *, split_steps: int, steps: int, register_steps: int) -> None:
    """The progress bar counted the most steps of both refinements and of the registration rounds (``total_steps``):
    take off those not run."""
    state.bar.total -= cfg.most_steps() - (split_steps + steps + register_steps)
    state.bar.refresh()
