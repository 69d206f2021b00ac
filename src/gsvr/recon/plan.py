"""What the workflow decides when Snakemake parses it: every method's settings checked, and what a run of a
method asks of a scheduler (:func:`uses_cuda`, :func:`memory_mb`, :func:`runtime_min`).

Snakemake imports this module on every parse of the workflow (each ``snakemake -n``, and twice per SLURM job),
so it imports neither torch nor the reconstruction code: running the methods is :mod:`gsvr.recon.files`.
A workflow *method* is a mapping of settings with an optional ``engine`` key: one of gsvr's own
:data:`ENGINES` (settings: :meth:`ReconConfig.from_dict`) or an external tool of
:data:`gsvr.baselines.external.PROGRAMS` (settings: :meth:`ExternalSettings.from_dict`).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from gsvr.baselines.external import PROGRAMS, ExternalSettings
from gsvr.errors import GsvrError
from gsvr.recon.config import ReconConfig

#: gsvr's own reconstruction engines (their functions: :data:`gsvr.recon.files.METHODS`): the Gaussian engine,
#: the classical voxel-grid SVR baseline and the average of the stacks resampled in header geometry (the floor).
ENGINES = ("gsvr", "svr_classic", "stack_average")
#: Device nodes of GPU drivers (NVIDIA; AMD ROCm, which torch also reports as CUDA; WSL's): without any of them a
#: Linux host has no GPU torch could use.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


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
        if engine in ENGINES:
            return engine, ReconConfig.from_dict(settings, source=source)
    except (GsvrError, TypeError, ValueError) as exc:
        # Checks made after parsing (dataclass __post_init__) do not know the source: name it here.
        message = str(exc)
        if not message.startswith(source):
            message = f"{source}: {message.removeprefix('config: ')}"
        raise GsvrError(message) from exc
    raise GsvrError(f"{source}: engine must be one of {sorted(ENGINES)} (gsvr) or {sorted(PROGRAMS)} (external tools), "
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
    CUDA device in this process; on Linux, only where a GPU driver's device node exists: ``GPU_DEVICE_NODES``)."""
    if auto_device == "detect":
        if sys.platform == "linux" and not any(os.path.exists(node) for node in GPU_DEVICE_NODES):
            return False  # no GPU driver here: torch could not see one (and importing it costs seconds per parse)
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

    paths, _ = stack_paths(stacks, None)
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


def stack_paths(stacks: Sequence[str] | str | os.PathLike, masks: Sequence[str] | None
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


__all__ = ["CUDA_ENGINES", "CUDA_TOOLS", "DEFAULT_ENGINE", "ENGINES", "GPU_DEVICE_NODES", "auto_means_cuda", "check_method_settings",
           "check_methods", "memory_mb", "runtime_min", "stack_paths", "stack_voxels", "uses_cuda"]
