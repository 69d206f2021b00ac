"""File-level entry points shared by the CLI and the workflow scripts: :func:`reconstruct_files`, and a
workflow method (settings checked by :mod:`gsvr.recon.plan`) run on files by :func:`run_method_files` and
:func:`assess_method_files`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from gsvr.baselines.external import run_external
from gsvr.errors import GsvrError
from gsvr.io import load_stacks, save_volume
from gsvr.io.nifti import atomic_outputs, check_outputs, check_writable
from gsvr.progress import Progress
from gsvr.provenance import Run, sidecar_path, write_sidecar
from gsvr.recon.config import ReconConfig
from gsvr.recon.engine import HISTORY_COLUMNS, Result, reconstruct, resolve_device
from gsvr.recon.plan import CUDA_ENGINES, check_method_settings, stack_paths, uses_cuda
from gsvr.recon.volume import save_model

log = logging.getLogger("gsvr")


def _classic(stacks, config, *, progress, initial_motion=None):
    from gsvr.baselines import reconstruct_classic

    return reconstruct_classic(stacks, config, progress=progress, initial_motion=initial_motion)


def _stack_average(stacks, config, *, progress):
    from gsvr.baselines import reconstruct_stack_average

    return reconstruct_stack_average(stacks, config, progress=progress)


#: Reconstruction methods by name (:data:`gsvr.recon.plan.ENGINES`): the Gaussian engine, the classical voxel-grid
#: SVR baseline and the average of the stacks resampled in header geometry (the floor).
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
    progress: Progress = True,
    method: str = "gsvr",
    checkpoint: str | None = None,
    resume: bool = False,
    command: Sequence[str] | None = None,
    source: str | None = None,
) -> Result:
    """Load stacks, reconstruct with ``method`` ("gsvr", "svr_classic" or "stack_average") and write every requested
    output as one set: a failure while writing any of them leaves none written.

    The volume's provenance sidecar (:mod:`gsvr.provenance`: ``volume.nii.gz`` -> ``volume.json``) is always
    written, in the same set; it records ``command`` (default ``sys.argv``) and ``source`` (where the
    settings came from). ``progress``: see :mod:`gsvr.progress`.
    """
    if method not in METHODS:
        raise GsvrError(f"unknown method {method!r}; known: {sorted(METHODS)}")
    if method != "gsvr" and output_model:
        raise GsvrError(f"{output_model}: method {method} has no Gaussian model to save")
    if method != "gsvr" and (checkpoint or resume):
        raise GsvrError(f"method {method} does not write checkpoints (only gsvr does)")
    sidecar = sidecar_path(output_volume)
    check_outputs({"--output-volume": output_volume, "the sidecar of --output-volume": sidecar,
                   "--output-slices-tsv": output_slices_tsv, "--output-model": output_model, "--output-log": output_log,
                   "--checkpoint": checkpoint}, inputs=[*stacks, *(masks or ())], nifti=["--output-volume"])
    if checkpoint and not resume and Path(checkpoint).exists():
        raise GsvrError(f"{checkpoint}: --checkpoint names an existing file; add --resume to continue from it, "
                        "or remove it")
    t_start = time.perf_counter()
    loaded = load_stacks(stacks, masks, thicknesses)
    device = str(resolve_device(config.run.device)) if method in CUDA_ENGINES else "cpu"
    run = Run(method=method, settings=config, stacks=stacks, masks=masks, thicknesses_mm=[s.thickness_mm for s in loaded],
              device=device, wall_s=0.0, command=command, source=source)
    extra = {"checkpoint": checkpoint, "resume": resume} if method == "gsvr" else {}
    result = METHODS[method](loaded, config, progress=progress, **extra)
    run.wall_s = time.perf_counter() - t_start
    outputs = [output_volume, sidecar, output_slices_tsv, output_model, output_log]
    with atomic_outputs(outputs) as (volume, provenance, slices, model, log_tsv):
        save_volume(volume, result.volume.data, result.volume.affine)
        write_sidecar(provenance, run.record())
        if slices:
            result.slices.to_csv(slices, sep="\t", index=False, float_format="%.5g")
        if model:
            save_model(model, result.model)
        if log_tsv:
            result.history.to_csv(log_tsv, sep="\t", index=False, float_format="%.6g")
    log.info("wrote %s (%s voxels) in %.1f s", output_volume, "x".join(map(str, result.volume.data.shape)), result.elapsed_s)
    return result


def run_method_files(
    settings: Mapping[str, Any] | None,
    stacks: Sequence[str] | str | os.PathLike,
    masks: Sequence[str] | None,
    thicknesses: Sequence[float] | None,
    *,
    output_volume: str,
    output_slices_tsv: str,
    output_log: str,
    source: str = "method",
    progress: Progress = "log",
    device: str | None = None,
) -> Result | None:
    """Reconstruct with one method (settings as :func:`check_method_settings` takes them) and write its
    volume, provenance sidecar, per-slice table and per-step log as one set.

    ``stacks`` is a list of files or a folder of preprocessed stacks (with their masks; ``masks`` None).
    gsvr's engines go through :func:`reconstruct_files` (returns its :class:`Result`); an external tool
    writes the volume only, and its slice table and log are header-only (the tools report neither in
    gsvr's format; returns None). ``device`` ("cpu" or "cuda"), when given, replaces the settings'
    ``run.device``: the device the workflow planned the job for (:func:`uses_cuda`). ``progress``: log
    lines by default (see :mod:`gsvr.progress`).
    """
    engine, parsed = check_method_settings(settings, source)
    stacks, masks = stack_paths(stacks, masks)
    if isinstance(parsed, ReconConfig):
        if device:
            parsed = parsed.updated({"run.device": device}, source=source)
        return reconstruct_files(stacks, masks, thicknesses, parsed, output_volume=output_volume,
                                 output_slices_tsv=output_slices_tsv, output_log=output_log, progress=progress,
                                 method=engine, source=source)
    import pandas as pd

    if masks is None:
        raise GsvrError(f"{source}: {engine} needs a brain mask per stack")
    sidecar = sidecar_path(output_volume)
    for out in (output_volume, sidecar, output_slices_tsv, output_log):
        check_writable(out)
    outputs = [output_volume, sidecar, output_slices_tsv, output_log]
    with atomic_outputs(outputs) as (volume, provenance, slices, log_tsv):
        elapsed = run_external(parsed, stacks, masks, thicknesses, str(volume))
        run = Run(method=engine, settings=parsed, stacks=stacks, masks=masks, thicknesses_mm=thicknesses, wall_s=elapsed,
                  device="cuda" if uses_cuda(engine, parsed, cuda_available=True) else "cpu", source=source)
        write_sidecar(provenance, run.record())
        for columns, path in ((["stack", "slice_index"], slices), (HISTORY_COLUMNS, log_tsv)):
            pd.DataFrame(columns=columns).to_csv(path, sep="\t", index=False)
    return None


def assess_method_files(
    settings: Mapping[str, Any] | None,
    stacks: Sequence[str] | str | os.PathLike,
    masks: Sequence[str] | None,
    thicknesses: Sequence[float] | None,
    *,
    output_tsv: str,
    source: str = "method",
    progress: Progress = "log",
    device: str | None = None,
    full_run_slices: str | None = None,
):
    """Leave-one-stack-out assessment (:func:`gsvr.evaluate.assess.assess_files`) of one of gsvr's own
    methods (settings as :func:`check_method_settings` takes them; external tools are refused);
    ``stacks``, ``progress`` and ``device`` as in :func:`run_method_files`; ``full_run_slices``: the slice table of
    the method's reconstruction of these stacks (the folds start from it; without it, the assessment makes that
    reconstruction first). Returns the table, written to ``output_tsv`` atomically."""
    from gsvr.evaluate.assess import assess_files

    engine, parsed = check_method_settings(settings, source)
    if not isinstance(parsed, ReconConfig):
        raise GsvrError(f"{source}: the assessment reconstructs with gsvr's own methods {sorted(METHODS)}, not {engine}")
    if device:
        parsed = parsed.updated({"run.device": device}, source=source)
    stacks, masks = stack_paths(stacks, masks)
    return assess_files(stacks, masks, thicknesses, parsed, method=engine, output_tsv=output_tsv, progress=progress,
                        full_motion_tsv=full_run_slices)


__all__ = ["METHODS", "assess_method_files", "reconstruct_files", "run_method_files"]
