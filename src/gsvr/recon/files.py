"""File-level entry points shared by the CLI and the workflow scripts."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from gsvr.errors import GsvrError
from gsvr.io import load_stacks, save_volume
from gsvr.io.nifti import atomic_output
from gsvr.recon.config import ReconConfig
from gsvr.recon.engine import Result, reconstruct
from gsvr.recon.volume import save_model

log = logging.getLogger("gsvr")


def _classic(stacks, config, *, progress):
    from gsvr.baselines import reconstruct_classic

    return reconstruct_classic(stacks, config, progress=progress)


#: Reconstruction methods by name: the Gaussian engine and the classical voxel-grid SVR baseline.
METHODS = {"gsvr": reconstruct, "svr_classic": _classic}


def check_writable(path: str | os.PathLike) -> None:
    parent = Path(path).parent
    if not parent.is_dir():
        raise GsvrError(f"{path}: output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise GsvrError(f"{path}: output folder {parent} is not writable")


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
) -> Result:
    """Load stacks, reconstruct with ``method`` ("gsvr" or "svr_classic"), write every requested output (each atomically)."""
    if method not in METHODS:
        raise GsvrError(f"unknown method {method!r}; known: {sorted(METHODS)}")
    if method != "gsvr" and output_model:
        raise GsvrError(f"{output_model}: method {method} has no Gaussian model to save")
    for out in filter(None, (output_volume, output_slices_tsv, output_model, output_log)):
        check_writable(out)
    result = METHODS[method](load_stacks(stacks, masks, thicknesses), config, progress=progress)
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
