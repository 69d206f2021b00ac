"""Stage svr: classical SVR cycles on a voxel grid estimate slice motion and weights (see recon/svr.py).

They bring the slices close before the Gaussian stages, whose local gradients alone would let the
field absorb misalignment. Checkpointed after every cycle."""

from __future__ import annotations

from gsvr.recon.config import SvrSettings
from gsvr.recon.state import ReconState, log_peak_memory, slice_weight_fn, support_radius
from gsvr.recon.svr import output_super_resolution, svr_cycles

NAME = "svr"


def run(state: ReconState, cfg: SvrSettings | None) -> ReconState:
    ck = state.ck
    if not state.cfg.svr_cycles_run or ck.skips(NAME):
        return state
    tick = svr_progress(state, cfg.n_cycles(len(state.stacks)))

    def cycle_done(cycles: int, weights, pixel_weights) -> None:
        state.weights = weights
        state.save(NAME, cycles, pixel_weights=pixel_weights)

    resumed = ck.resumes(NAME)
    pixel_weights = resumed["pixel_weights"].to(state.device) if resumed else None
    state.svr, state.weights, pixel_weights = svr_cycles(
        state.data, state.motion, cfg, progress=tick, on_cycle=cycle_done, start_cycle=resumed["step"] if resumed else 0,
        weights=state.weights, pixel_weights=pixel_weights, weight_fn=slice_weight_fn(state.cfg),
        output_mm=state.cfg.output.resolution_mm, radius_mm=support_radius(state.stacks))
    state.pixel_weights = pixel_weights
    if state.cfg.fits_output_volume:
        state.bar.set_postfix_str("super-resolution on the output grid")
        state.svr = output_super_resolution(state.data, state.motion, state.weights[state.data.slice_idx] * pixel_weights,
                                            cfg, state.cfg.output.resolution_mm, support_radius(state.stacks))
    log_peak_memory("the SVR cycles")
    return state


def svr_progress(state: ReconState, n_cycles: int):
    """The ``progress`` callback of :func:`svr_cycles`: logs each cycle's median NCC and ticks the bar."""

    def tick(cycle: int, ncc: float) -> None:
        state.record(NAME, ncc)
        state.bar.update(1)
        state.bar.set_postfix_str(f"svr {cycle + 1}/{n_cycles} ncc {ncc:.3f}")

    return tick
