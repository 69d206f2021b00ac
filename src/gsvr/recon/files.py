"""File-level entry points shared by the CLI and the workflow scripts."""

from __future__ import annotations

import logging
from typing import Sequence

from gsvr.errors import GsvrError
from gsvr.io import load_stacks, save_volume
from gsvr.io.nifti import atomic_output, check_writable
from gsvr.recon.config import ReconConfig
from gsvr.recon.engine import Result, reconstruct
from gsvr.recon.volume import save_model

log = logging.getLogger("gsvr")


def _classic(stacks, config, *, progress):
    from gsvr.baselines import reconstruct_classic

    return reconstruct_classic(stacks, config, progress=progress)


def _stack_average(stacks, config, *, progress):
    from gsvr.baselines import reconstruct_stack_average

    return reconstruct_stack_average(stacks, config, progress=progress)


#: Reconstruction methods by name: the Gaussian engine, the classical voxel-grid SVR baseline and the
#: average of the stacks resampled in header geometry (the floor).
METHODS = {"gsvr": reconstruct, "svr_classic": _classic, "stack_average": _stack_average}


def reconstruct_files(
    stacks: Sequence[str],
    masks: Sequence[str] | None,
    thicknesses: Sequence[float] | None,
    config: ReconConfig,
    *,
    output_volume: str,
    output_slices_tsv: str | None = None,
    output_model: str | None = None,
    output_log: str | None = None,
    progress: bool = True,
    method: str = "gsvr",
    checkpoint: str | None = None,
    resume: bool = False,
) -> Result:
    """Load stacks, reconstruct with ``method`` ("gsvr" or "svr_classic"), write every requested output (each atomically)."""
    if method not in METHODS:
        raise GsvrError(f"unknown method {method!r}; known: {sorted(METHODS)}")
    if method != "gsvr" and output_model:
        raise GsvrError(f"{output_model}: method {method} has no Gaussian model to save")
    if method != "gsvr" and (checkpoint or resume):
        raise GsvrError(f"method {method} does not write checkpoints (only gsvr does)")
    if checkpoint:
        check_writable(checkpoint)
    for out in filter(None, (output_volume, output_slices_tsv, output_model, output_log)):
        check_writable(out)
    extra = {"checkpoint": checkpoint, "resume": resume} if method == "gsvr" else {}
    result = METHODS[method](load_stacks(stacks, masks, thicknesses), config, progress=progress, **extra)
    save_volume(output_volume, result.volume.data, result.volume.affine)
    if output_slices_tsv:
        with atomic_output(output_slices_tsv) as tmp:
            result.slices.to_csv(tmp, sep="\t", index=False, float_format="%.5g")
    if output_model:
        save_model(output_model, result.model)
    if output_log:
        with atomic_output(output_log) as tmp:
            result.history.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    log.info("wrote %s (%s voxels) in %.1f s", output_volume, "x".join(map(str, result.volume.data.shape)), result.elapsed_s)
    return result
