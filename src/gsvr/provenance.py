"""Provenance sidecars: what made an output volume, in a JSON file beside it.

``recon.nii.gz`` gets ``recon.json`` (:func:`sidecar_path`) with the gsvr version, the method, the
resolved settings (the full :class:`~gsvr.recon.config.ReconConfig` as nested values), the input
files with their SHA-256 and slice thicknesses, the command line, the device, the torch and Python
versions, the wall time and the peak memory. ``gsvr reconstruct --config recon.json`` (and ``gsvr svr``,
``gsvr assess``) reads the settings back (:func:`read_settings`): on the same inputs the run repeats
(bit for bit on CPU).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from gsvr import __version__
from gsvr.errors import GsvrError

#: The ``format`` member that marks a file as a gsvr provenance sidecar.
FORMAT = "gsvr provenance 1"
_NIFTI = (".nii.gz", ".nii")


def sidecar_path(volume: str | os.PathLike) -> Path:
    """``volume.nii.gz`` / ``volume.nii`` -> ``volume.json`` (same folder, same base name)."""
    path = Path(volume)
    name = path.name
    for suffix in _NIFTI:
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".json")
    return path.with_name(name + ".json")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def peak_memory_mb(device: str = "cpu") -> dict[str, float | None]:
    """Peak resident memory of this process so far (``ru_maxrss``) and, on CUDA, torch's peak allocated
    device memory (``torch.cuda.max_memory_allocated``), in MB (None where not available)."""
    rss = None
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
        rss = round(kb / 1024 / (1024 if sys.platform == "darwin" else 1), 1)
    except ImportError:  # Windows
        pass
    cuda = None
    if str(device).startswith("cuda"):
        import torch

        cuda = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return {"peak_rss_mb": rss, "cuda_max_memory_allocated_mb": cuda}


@dataclass
class Run:
    """What one run used and what it cost; :meth:`record` makes the sidecar's content."""

    method: str  #: gsvr, svr_classic, stack_average or an external tool
    settings: Any  #: a ReconConfig (or ExternalSettings) dataclass, written as nested values
    stacks: Sequence[str]
    masks: Sequence[str] | None
    thicknesses_mm: Sequence[float] | None  #: as resolved (each stack's slice spacing where none was given)
    device: str  #: where it ran: "cpu" or "cuda"
    wall_s: float  #: loading and reconstruction
    command: Sequence[str] | None = None  #: the command line (None: ``sys.argv``)
    source: str | None = None  #: where the settings came from (e.g. "config methods.gsvr")
    started: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))

    def record(self) -> dict[str, Any]:
        import torch

        masks = list(self.masks) if self.masks else [None] * len(self.stacks)
        thick = list(self.thicknesses_mm) if self.thicknesses_mm else [None] * len(self.stacks)
        inputs = [{"stack": str(s), "sha256": file_sha256(s), "thickness_mm": t,
                   "mask": None if m is None else str(m), "mask_sha256": None if m is None else file_sha256(m)}
                  for s, m, t in zip(self.stacks, masks, thick)]
        return {
            "format": FORMAT,
            "gsvr_version": __version__,
            "method": self.method,
            "source": self.source,
            "settings": _plain(asdict(self.settings)),
            "inputs": inputs,
            "command": [str(a) for a in (sys.argv if self.command is None else self.command)],
            "cwd": os.getcwd(),
            "device": self.device,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "host": platform.node(),
            "started": self.started,
            "wall_s": round(self.wall_s, 3),
            **peak_memory_mb(self.device),
        }


def _plain(value: Any) -> Any:
    """Tuples as lists (JSON), recursively."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_sidecar(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Write ``record`` as indented JSON (not atomically: give a temporary path of ``atomic_outputs``)."""
    import json

    Path(path).write_text(json.dumps(record, indent=2) + "\n")


def is_sidecar(values: Any) -> bool:
    return isinstance(values, dict) and values.get("format") == FORMAT


def read_settings(path: str | os.PathLike, *, method: str | None = None) -> dict[str, Any]:
    """The settings in a config file: a YAML file of settings, or a provenance sidecar's ``settings``.

    ``method``: the method about to run; a sidecar written by another method is refused (its settings
    would run the wrong engine).
    """
    from gsvr.recon.typed import read_yaml

    values = read_yaml(path)
    if not is_sidecar(values):
        return values
    made_by = values.get("method")
    if method is not None and made_by != method:
        raise GsvrError(f"{path}: a provenance sidecar of method {made_by}, not {method}; "
                        f"run {_command_of(made_by)} with it")
    settings = values.get("settings")
    if not isinstance(settings, dict):
        raise GsvrError(f"{path}: the provenance sidecar has no settings")
    return settings


def _command_of(method: str | None) -> str:
    return {"gsvr": "gsvr reconstruct", "svr_classic": "gsvr svr"}.get(method, f"the {method} method")


__all__ = ["FORMAT", "Run", "file_sha256", "is_sidecar", "peak_memory_mb", "read_settings", "sidecar_path",
           "write_sidecar"]
