"""The state a reconstruction carries from stage to stage, and the result it ends in."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from gsvr.errors import GsvrError
from gsvr.io.nifti import Stack
from gsvr.model.field import GaussianField
from gsvr.model.grid import GaussianGrid
from gsvr.provenance import peak_memory_mb
from gsvr.recon.checkpoint import Checkpointer
from gsvr.recon.config import ReconConfig, SliceWeightsConfig
from gsvr.geometry import matrix_to_axis_angle
from gsvr.recon.slices import SliceData, SliceMotion, header_motion
from gsvr.recon.svr import SvrState, robust_outlier_weights
from gsvr.recon.volume import SampledVolume

log = logging.getLogger(__name__)

#: Columns of the per-step log (``Result.history``, ``--output-log``); ``value`` is the ``measure``.
HISTORY_COLUMNS = ["step", "stage", "elapsed_s", "value", "measure"]
#: Stages of the log whose rows are evaluations, not steps (the progress bar does not count them).
EVALUATIONS = {"refine_holdout"}
#: What ``value`` measures in each stage of the log.
STAGE_MEASURES = {"svr": "median slice NCC (leave one stack out)", "fit": "L1 to the SVR volume",
                  "refine_fit": "L1 to the volume of refine's split", "refine_split": "weighted squared error of refine's split",
                  "refine_holdout": "held-out slices' weighted squared error (refine's split)",
                  "refine": "weighted squared slice error",
                  "refine_register": "weighted squared slice error after registering the slices to the refined field",
                  "joint": "weighted L1 slice loss"}


@dataclass
class Result:
    """What a reconstruction returns.

    Attributes:
        volume: the sampled volume (data in input intensity units, world affine).
        slices: one row per slice: stack, slice index, rotation (deg), translation (mm), scale, weight.
        history: one row per step (see ``HISTORY_COLUMNS`` and ``STAGE_MEASURES``): SVR cycles (median slice NCC),
            steps of the fit to the SVR volume (L1 to it), of the refinement (its split's fit and steps, its
            held-out evaluations, the steps of the field of all slices and those of its registration rounds) and joint
            steps, with wall time.
        model: everything needed to re-sample the volume (see :func:`gsvr.recon.volume.load_model`).
        config: the configuration used.
        elapsed_s: wall time of the optimisation and sampling.
    """

    volume: SampledVolume
    slices: pd.DataFrame
    history: pd.DataFrame
    model: dict
    config: ReconConfig
    elapsed_s: float


@dataclass
class ProgressiveGrid:
    """M-Gaussian's progressive grid: the grid the Gaussians sit on, and the support radius that chooses its nodes."""

    grid: GaussianGrid
    radius_mm: float


@dataclass
class ReconState:
    """Everything the stages hand on. Stages fill it in order (see :mod:`gsvr.recon.stages`)."""

    cfg: ReconConfig
    ck: Checkpointer
    stacks: list[Stack]
    progress: bool = True
    t_start: float = field(default_factory=time.perf_counter)
    device: torch.device = torch.device("cpu")
    initial_motion: pd.DataFrame | None = None  # slice table the motions start from (None: the headers)
    # From the slices stage on.
    data: SliceData | None = None
    motion: SliceMotion | None = None
    weights: Tensor | None = None  # [S] slice weights
    pixel_weights: Tensor | None = None  # [P] the SVR cycles' pixel weights (ones unless svr.robust is "em")
    gen: torch.Generator | None = None
    history: list = field(default_factory=list)
    bar: object = None
    # From the svr, init and fit stages on.
    svr: SvrState | None = None
    covered: Tensor | None = None  # [I, J, K] bool: SVR voxels within the support radius of the slices
    field: GaussianField | None = None
    progressive: ProgressiveGrid | None = None
    # From the sample stage.
    result: Result | None = None

    def record(self, stage: str, value: float) -> None:
        """Append one row of the per-step log (``HISTORY_COLUMNS``)."""
        self.history.append((len(self.history) + 1, stage, time.perf_counter() - self.t_start, value, STAGE_MEASURES[stage]))

    def save(self, stage: str, step: int, **extra) -> None:
        """Checkpoint the state shared by all stages, plus the stage's own ``extra``."""
        self.ck.save(stage, step, motion=self.motion.state_dict(), weights=self.weights, history=list(self.history),
                     gen=self.gen.get_state(), elapsed_s=time.perf_counter() - self.t_start, **extra)

    @property
    def k(self) -> int:
        return self.cfg.model.k_neighbors


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GsvrError("--device cuda requested but torch sees no CUDA device")
    return torch.device(name)


def log_peak_memory(after: str) -> None:
    """Peak resident memory of the process so far (a memory report names the stage that set it)."""
    rss_mb = peak_memory_mb()["peak_rss_mb"]
    if rss_mb is not None:  # None on Windows
        log.info("after %s: peak resident memory %.2f GB", after, rss_mb / 1024)


def robust_slice_weights(mean_abs_res: Tensor, cfg: SliceWeightsConfig) -> Tensor:
    """GSVR public code: z = (r - median) / max(1.4826 MAD, floor); w = exp(-1/2 (max(z, 0) / s)^2)."""
    return robust_outlier_weights(mean_abs_res, cfg.z_scale, cfg.mad_floor, "above")


def slice_weight_fn(cfg: ReconConfig):
    """The SVR cycles' ``weight_fn``: robust weights, or all ones when ``slice_weights`` is null."""
    if cfg.slice_weights is None:
        return torch.ones_like
    return lambda r: robust_slice_weights(r, cfg.slice_weights)


def support_radius(stacks: Sequence[Stack]) -> float:
    """Distance (mm) from the nearest in-mask pixel within which a voxel belongs to the volume: the
    slice PSF's through-plane reach (one thickness or slice spacing) plus one in-plane pixel (half a
    thickness cuts brain-mask voxels at the boundary)."""
    return float(max(max(s.spacing_mm[2], s.thickness_mm) + max(s.spacing_mm[:2]) for s in stacks))


def slice_table(data: SliceData, motion: SliceMotion, weights: Tensor, stacks: Sequence[Stack]) -> pd.DataFrame:
    """One row per slice: its stack, index, motion, intensity scale and weight.

    The motion is relative to the stack's input header (stack alignment included), in world mm: a pixel at
    x goes to R (x - c) + c + t, with R the rotation vector (rx, ry, rz) in degrees, c = (cx, cy, cz) the
    slice centre and t = (tx, ty, tz). See :func:`gsvr.recon.slices.header_motion`."""
    rot, centre, trans = header_motion(data, motion, stacks)
    rotvec = np.degrees(matrix_to_axis_angle(torch.from_numpy(rot)).numpy())
    return pd.DataFrame({
        "stack": [stacks[i].name for i in data.stack_of_slice],
        "stack_index": data.stack_of_slice,
        "slice_index": data.slice_in_stack,
        "rx_deg": rotvec[:, 0], "ry_deg": rotvec[:, 1], "rz_deg": rotvec[:, 2],
        "cx_mm": centre[:, 0], "cy_mm": centre[:, 1], "cz_mm": centre[:, 2],
        "tx_mm": trans[:, 0], "ty_mm": trans[:, 1], "tz_mm": trans[:, 2],
        "intensity_scale": torch.exp(motion.log_scale).detach().cpu().numpy(),
        "weight": weights.cpu().numpy(),
    })
