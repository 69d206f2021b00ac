"""File-level entry points shared by the CLI and the workflow scripts.

A workflow *method* is a mapping of settings with an optional ``engine`` key: one of gsvr's own
:data:`METHODS` (settings: :meth:`ReconConfig.from_dict`) or an external tool of
:data:`gsvr.baselines.external.PROGRAMS` (settings: :meth:`ExternalSettings.from_dict`).
:func:`check_methods` validates them all (the workflow calls it when Snakemake parses the
workflow); :func:`run_method_files` and :func:`assess_method_files` run one on files. What a run of a
method asks of a scheduler: :func:`uses_cuda` (a GPU), :func:`memory_mb` and :func:`runtime_min`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from gsvr.baselines.external import PROGRAMS, ExternalSettings, run_external
from gsvr.errors import GsvrError
from gsvr.io import load_stacks, save_volume
from gsvr.io.nifti import atomic_outputs, check_outputs, check_writable
from gsvr.progress import Progress
from gsvr.provenance import Run, sidecar_path, write_sidecar
from gsvr.recon.config import ReconConfig
from gsvr.recon.engine import HISTORY_COLUMNS, Result, reconstruct, resolve_device
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


#: gsvr's own engines that run where ``run.device`` says (``stack_average`` resamples with SimpleITK on the CPU
#: whatever it says).
CUDA_ENGINES = ("gsvr", "svr_classic")
#: External tools that run on a GPU: NeSVoR (GPU 0 unless told otherwise); SVRTK and NiftyMIC run on CPUs.
CUDA_TOOLS = ("nesvor",)


def uses_cuda(engine: str, settings: ReconConfig | ExternalSettings, *, cuda_available: bool) -> bool:
    """Whether a run of the method (as :func:`check_method_settings` returns it) uses a CUDA device:
    ``run.device: cuda``, or ``auto`` where ``cuda_available``, for the engines of :data:`CUDA_ENGINES`;
    the tools of :data:`CUDA_TOOLS`. (The workflow asks its scheduler for a GPU exactly then.)"""
    if isinstance(settings, ExternalSettings):
        return settings.tool in CUDA_TOOLS
    if engine not in CUDA_ENGINES:
        return False
    return settings.run.device == "cuda" or (settings.run.device == "auto" and cuda_available)


def auto_means_cuda(auto_device: str) -> bool:
    """Whether ``run.device: auto`` is to run on CUDA: ``auto_device`` "cuda", "cpu", or "detect" (torch sees a
    CUDA device in this process)."""
    if auto_device == "detect":
        import torch

        return torch.cuda.is_available()
    if auto_device in ("cuda", "cpu"):
        return auto_device == "cuda"
    raise GsvrError(f"auto_device must be detect, cuda or cpu, got {auto_device!r}")


# Resources to request for one run, fitted to the peak resident memory and wall times of docs/results.md
# (sections 1, 2 and 6; 2 CPU cores, torch on CPU): memory grows linearly with the input stacks' voxels.
MEMORY_BASE_MB = 700
MEMORY_PER_MVOXEL_MB = 300
MEMORY_MARGIN = 1.5  #: requested / estimated peak
MEMORY_MIN_MB = 2000  #: also what stack_average is given (two float64 grids of the output and the stacks)
MEMORY_CUDA_MB = 2000  #: host memory of the CUDA runtime on top (not measured)
MEMORY_EXTERNAL_MB = 16000  #: external tools (not measured)
RUNTIME_MIN = {"gsvr": 30, "svr_classic": 30, "stack_average": 10}  #: minutes per run, before joint steps
RUNTIME_PER_JOINT_STEP_MIN = 0.5  #: twice a joint step at 0.8 mm (docs/results.md section 6)
RUNTIME_EXTERNAL_MIN = 120  #: external tools (not measured)


def stack_voxels(stacks: Sequence[str] | str | os.PathLike) -> int:
    """Voxels in the stacks (files, or a folder of preprocessed stacks), read from their headers. A missing
    file raises the operating system's FileNotFoundError naming it (Snakemake then plans the resource as <TBD>)."""
    import nibabel as nib

    paths, _ = _stack_paths(stacks, None)
    for p in paths:
        os.stat(p)
    return sum(math.prod(nib.load(p).shape[:3]) for p in paths)


def memory_mb(engine: str, settings: ReconConfig | ExternalSettings, stacks: Sequence[str] | str | os.PathLike, *,
              cuda: bool) -> int:
    """Memory (MB) to request for one run of the method on ``stacks``: the measured peak resident memory
    (``MEMORY_BASE_MB`` + ``MEMORY_PER_MVOXEL_MB`` per million stack voxels) times ``MEMORY_MARGIN``, plus
    ``MEMORY_CUDA_MB`` on CUDA, at least ``MEMORY_MIN_MB``, rounded up to 500 MB."""
    if isinstance(settings, ExternalSettings):
        return MEMORY_EXTERNAL_MB
    if engine not in CUDA_ENGINES:
        return MEMORY_MIN_MB
    peak = MEMORY_BASE_MB + MEMORY_PER_MVOXEL_MB * stack_voxels(stacks) / 1e6
    need = max(MEMORY_MIN_MB, MEMORY_MARGIN * peak + (MEMORY_CUDA_MB if cuda else 0))
    return int(500 * math.ceil(need / 500))


def runtime_min(engine: str, settings: ReconConfig | ExternalSettings, *, runs: int = 1) -> int:
    """Minutes to request for ``runs`` reconstructions with the method (``RUNTIME_MIN`` plus
    ``RUNTIME_PER_JOINT_STEP_MIN`` per joint step, coarse ones included, for each run)."""
    if isinstance(settings, ExternalSettings):
        return RUNTIME_EXTERNAL_MIN * runs
    steps = settings.joint.steps + (settings.joint.multires.steps if settings.joint.multires else 0)
    return int(math.ceil(runs * (RUNTIME_MIN[engine] + RUNTIME_PER_JOINT_STEP_MIN * steps)))


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
    stacks, masks = _stack_paths(stacks, masks)
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
):
    """Leave-one-stack-out assessment (:func:`gsvr.evaluate.assess.assess_files`) of one of gsvr's own
    methods (settings as :func:`check_method_settings` takes them; external tools are refused);
    ``stacks``, ``progress`` and ``device`` as in :func:`run_method_files`. Returns the table, written to
    ``output_tsv`` atomically."""
    from gsvr.evaluate.assess import assess_files

    engine, parsed = check_method_settings(settings, source)
    if not isinstance(parsed, ReconConfig):
        raise GsvrError(f"{source}: the assessment reconstructs with gsvr's own methods {sorted(METHODS)}, not {engine}")
    if device:
        parsed = parsed.updated({"run.device": device}, source=source)
    stacks, masks = _stack_paths(stacks, masks)
    return assess_files(stacks, masks, thicknesses, parsed, method=engine, output_tsv=output_tsv, progress=progress)


__all__ = ["CUDA_ENGINES", "CUDA_TOOLS", "DEFAULT_ENGINE", "METHODS", "assess_method_files", "auto_means_cuda",
           "check_method_settings", "check_methods", "memory_mb", "reconstruct_files", "run_method_files", "runtime_min",
           "stack_voxels", "uses_cuda"]
