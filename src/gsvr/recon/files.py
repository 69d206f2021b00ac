"""File-level entry points shared by the CLI and the workflow scripts.

A workflow *method* is a mapping of settings with an optional ``engine`` key: one of gsvr's own
:data:`METHODS` (settings: :meth:`ReconConfig.from_dict`) or an external tool of
:data:`gsvr.baselines.external.PROGRAMS` (settings: :meth:`ExternalSettings.from_dict`).
:func:`check_methods` validates them all (the workflow calls it when Snakemake parses the
workflow); :func:`run_method_files` and :func:`assess_method_files` run one on files.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from gsvr.baselines.external import PROGRAMS, ExternalSettings, run_external
from gsvr.errors import GsvrError
from gsvr.io import load_stacks, save_volume
from gsvr.io.nifti import atomic_output, atomic_outputs, check_outputs, check_writable
from gsvr.recon.config import ReconConfig
from gsvr.recon.engine import HISTORY_COLUMNS, Result, reconstruct
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
    """Load stacks, reconstruct with ``method`` ("gsvr", "svr_classic" or "stack_average") and write every requested
    output as one set: a failure while writing any of them leaves none written."""
    if method not in METHODS:
        raise GsvrError(f"unknown method {method!r}; known: {sorted(METHODS)}")
    if method != "gsvr" and output_model:
        raise GsvrError(f"{output_model}: method {method} has no Gaussian model to save")
    if method != "gsvr" and (checkpoint or resume):
        raise GsvrError(f"method {method} does not write checkpoints (only gsvr does)")
    check_outputs({"--output-volume": output_volume, "--output-slices-tsv": output_slices_tsv,
                   "--output-model": output_model, "--output-log": output_log, "--checkpoint": checkpoint},
                  inputs=[*stacks, *(masks or ())], nifti=["--output-volume"])
    if checkpoint and not resume and Path(checkpoint).exists():
        raise GsvrError(f"{checkpoint}: --checkpoint names an existing file; add --resume to continue from it, "
                        "or remove it")
    extra = {"checkpoint": checkpoint, "resume": resume} if method == "gsvr" else {}
    result = METHODS[method](load_stacks(stacks, masks, thicknesses), config, progress=progress, **extra)
    with atomic_outputs([output_volume, output_slices_tsv, output_model, output_log]) as (volume, slices, model, log_tsv):
        save_volume(volume, result.volume.data, result.volume.affine)
        if slices:
            result.slices.to_csv(slices, sep="\t", index=False, float_format="%.5g")
        if model:
            save_model(model, result.model)
        if log_tsv:
            result.history.to_csv(log_tsv, sep="\t", index=False, float_format="%.6g")
    log.info("wrote %s (%s voxels) in %.1f s", output_volume, "x".join(map(str, result.volume.data.shape)), result.elapsed_s)
    return result


#: The engine of a method without an ``engine`` key.
DEFAULT_ENGINE = "gsvr"


def check_method_settings(settings: Mapping[str, Any] | None, source: str) -> tuple[str, ReconConfig | ExternalSettings]:
    """Validate one method's settings; returns ``(engine, parsed settings)``.

    ``engine`` (default gsvr) picks gsvr's own engine (the rest are :class:`ReconConfig` settings)
    or an external tool (:class:`ExternalSettings`). Any problem is a :class:`GsvrError` whose
    message starts with ``source`` (e.g. ``config methods.gsvr_fast``).
    """
    settings = dict(settings or {})
    engine = settings.pop("engine", DEFAULT_ENGINE)
    try:
        if engine in PROGRAMS:
            return engine, ExternalSettings.from_dict({**settings, "engine": engine}, source=source)
        if engine in METHODS:
            return engine, ReconConfig.from_dict(settings, source=source)
    except (GsvrError, TypeError, ValueError) as exc:
        # Checks made after parsing (dataclass __post_init__) do not know the source: name it here.
        message = str(exc)
        if not message.startswith(source):
            message = f"{source}: {message.removeprefix('config: ')}"
        raise GsvrError(message) from exc
    raise GsvrError(f"{source}: engine must be one of {sorted(METHODS)} (gsvr) or {sorted(PROGRAMS)} (external tools), "
                    f"got {engine!r}")


def check_methods(methods: Mapping[str, Mapping[str, Any] | None], *, source: str = "config"
                  ) -> dict[str, tuple[str, ReconConfig | ExternalSettings]]:
    """:func:`check_method_settings` of every method (name -> settings); one :class:`GsvrError` lists
    every method that fails, each as ``<source> methods.<name>: <problem>``."""
    checked, problems = {}, []
    for name, settings in methods.items():
        try:
            checked[name] = check_method_settings(settings, f"{source} methods.{name}")
        except GsvrError as exc:
            problems.append(str(exc))
    if problems:
        raise GsvrError("\n".join(problems))
    return checked


def _stack_paths(stacks: Sequence[str] | str | os.PathLike, masks: Sequence[str] | None
                 ) -> tuple[list[str], list[str] | None]:
    """Stack and mask paths; ``stacks`` may be a folder of preprocessed ``stack<k>.nii.gz`` with their
    ``stack<k>_mask.nii.gz`` (an acquired subject in the workflow)."""
    if isinstance(stacks, (str, os.PathLike)):
        if not Path(stacks).is_dir():
            return [str(stacks)], list(masks) if masks else None
        if masks:
            raise GsvrError(f"{stacks}: a folder of preprocessed stacks holds their masks; give no separate masks")
        from gsvr.preprocess.stacks import folder_stack_paths

        return folder_stack_paths(stacks)
    return list(stacks), list(masks) if masks else None


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
    progress: bool = False,
) -> Result | None:
    """Reconstruct with one method (settings as :func:`check_method_settings` takes them) and write its
    volume, per-slice table and per-step log (each atomically).

    ``stacks`` is a list of files or a folder of preprocessed stacks (with their masks; ``masks`` None).
    gsvr's engines go through :func:`reconstruct_files` (returns its :class:`Result`); an external tool
    writes the volume only, and its slice table and log are header-only (the tools report neither in
    gsvr's format; returns None).
    """
    engine, parsed = check_method_settings(settings, source)
    stacks, masks = _stack_paths(stacks, masks)
    if isinstance(parsed, ReconConfig):
        return reconstruct_files(stacks, masks, thicknesses, parsed, output_volume=output_volume,
                                 output_slices_tsv=output_slices_tsv, output_log=output_log, progress=progress,
                                 method=engine)
    import pandas as pd

    if masks is None:
        raise GsvrError(f"{source}: {engine} needs a brain mask per stack")
    for out in (output_volume, output_slices_tsv, output_log):
        check_writable(out)
    run_external(parsed, stacks, masks, thicknesses, output_volume)
    for columns, path in ((["stack", "slice_index"], output_slices_tsv), (HISTORY_COLUMNS, output_log)):
        with atomic_output(path) as tmp:
            pd.DataFrame(columns=columns).to_csv(tmp, sep="\t", index=False)
    return None


def assess_method_files(
    settings: Mapping[str, Any] | None,
    stacks: Sequence[str] | str | os.PathLike,
    masks: Sequence[str] | None,
    thicknesses: Sequence[float] | None,
    *,
    output_tsv: str,
    source: str = "method",
    progress: bool = False,
):
    """Leave-one-stack-out assessment (:func:`gsvr.evaluate.assess.assess_files`) of one of gsvr's own
    methods (settings as :func:`check_method_settings` takes them; external tools are refused);
    ``stacks`` as in :func:`run_method_files`. Returns the table, written to ``output_tsv`` atomically."""
    from gsvr.evaluate.assess import assess_files

    engine, parsed = check_method_settings(settings, source)
    if not isinstance(parsed, ReconConfig):
        raise GsvrError(f"{source}: the assessment reconstructs with gsvr's own methods {sorted(METHODS)}, not {engine}")
    stacks, masks = _stack_paths(stacks, masks)
    return assess_files(stacks, masks, thicknesses, parsed, method=engine, output_tsv=output_tsv, progress=progress)


__all__ = ["DEFAULT_ENGINE", "METHODS", "assess_method_files", "check_method_settings", "check_methods",
           "reconstruct_files", "run_method_files"]
