"""Stage sample: the model (field, motions, support) and the volume sampled from it at the output resolution."""

from __future__ import annotations

import time

import pandas as pd

from gsvr.recon.config import OutputConfig
from gsvr.recon.forward import current_positions
from gsvr.recon.state import HISTORY_COLUMNS, ReconState, Result, log_peak_memory, slice_table, support_radius
from gsvr.recon.volume import sample_volume

NAME = "sample"


def run(state: ReconState, cfg: OutputConfig) -> ReconState:
    state.bar.close()
    data, motion = state.data, state.motion
    x_final = current_positions(data, motion)
    model = {
        "field": state.field.state(),
        "origin_mm": data.origin_mm,
        "intensity_scale": data.intensity_scale,
        "support_points": x_final.cpu(),
        "support_radius_mm": support_radius(state.stacks),
        "config": state.cfg.to_dict(),
        "motion": {"rotvec": motion.rotvec.detach().cpu(), "trans": motion.trans.detach().cpu(),
                   "log_scale": motion.log_scale.detach().cpu(), "centre": data.centre.cpu()},
    }
    volume = sample_volume(model, resolution_mm=cfg.resolution_mm, device=state.device)
    log_peak_memory("sampling the volume")
    slices = slice_table(data, motion, state.weights, state.stacks)
    state.result = Result(volume=volume, slices=slices, history=pd.DataFrame(state.history, columns=HISTORY_COLUMNS),
                          model=model, config=state.cfg, elapsed_s=time.perf_counter() - state.t_start)
    return state
