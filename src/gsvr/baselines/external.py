"""Adapters for external SVR tools: NeSVoR, SVRTK and NiftyMIC, used when installed.

Each adapter builds the tool's command line from the same stacks, masks, thicknesses and output
resolution gsvr gets, runs it in a scratch folder, times it, and converts the result to gsvr's
output convention (float32, world affine in sform and qform). A tool that is not installed is
reported (:func:`availability`), never faked: the workflow lists it as "not installed".

``command`` (config) replaces the program name, e.g. a container:
``["docker", "run", "--rm", "-v", "/data:/data", "fetalsvrtk/svrtk", "mirtk"]``; ``options`` are
appended to the tool's arguments.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from gsvr.errors import GsvrError

log = logging.getLogger(__name__)

#: tool -> the program it runs by default (looked up on PATH)
PROGRAMS = {"nesvor": "nesvor", "svrtk": "mirtk", "niftymic": "niftymic_reconstruct_volume"}


@dataclass(frozen=True)
class ExternalSettings:
    """How to call one external tool (a workflow method with ``engine: nesvor|svrtk|niftymic``)."""

    tool: str
    output_resolution_mm: float = 0.8
    registration: str = "stack"  #: NeSVoR's --registration: stack or none (svort needs downloaded weights: not offered)
    command: tuple[str, ...] = ()  #: program (and container) replacing PROGRAMS[tool]
    options: tuple[str, ...] = ()  #: extra arguments appended to the tool's own

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "config") -> "ExternalSettings":
        """From a workflow method: ``engine``, ``output: {resolution_mm}``, ``align`` (null: the tool's
        ``--registration none``), ``command``, ``options`` (the same names as gsvr's own settings)."""
        known = {"engine", "output", "align", "command", "options"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GsvrError(f"{source}: unknown keys for an external tool: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        tool = d.get("engine")
        if tool not in PROGRAMS:
            raise GsvrError(f"{source}: engine must be one of {sorted(PROGRAMS)}, got {tool!r}")
        output = d.get("output") or {}
        if not isinstance(output, dict) or set(output) - {"resolution_mm"}:
            raise GsvrError(f"{source}: output of an external tool takes resolution_mm only, got {output!r}")
        resolution = output.get("resolution_mm", 0.8)
        if isinstance(resolution, bool) or not isinstance(resolution, (int, float)) or not 0 < resolution < float("inf"):
            raise GsvrError(f"{source}: output.resolution_mm must be a positive number, got {resolution!r}")
        align = d.get("align", {})
        if align is not None and align != {}:
            raise GsvrError(f"{source}: align of an external tool is null (no stack registration) or {{}} (the tool's own "
                            f"stack registration; NeSVoR's svort needs weights downloaded at run time: not offered), got {align!r}")
        return cls(tool=tool, output_resolution_mm=float(resolution), registration="none" if align is None else "stack",
                   command=tuple(d.get("command", ())), options=tuple(str(o) for o in d.get("options", ())))

    @property
    def program(self) -> tuple[str, ...]:
        return self.command or (PROGRAMS[self.tool],)


def availability(settings: ExternalSettings) -> str | None:
    """None when the tool's program is found on PATH, else why it cannot run (for the tables)."""
    exe = settings.program[0]
    if shutil.which(exe) is None:
        return f"not installed ({exe} not found on PATH)"
    return None


def build_command(settings: ExternalSettings, stacks: Sequence[str], masks: Sequence[str],
                  thicknesses: Sequence[float] | None, output: str) -> list[str]:
    """The tool's command line (absolute paths; run in a scratch folder)."""
    stacks = [str(Path(p).resolve()) for p in stacks]
    masks = [str(Path(p).resolve()) for p in masks]
    output = str(Path(output).resolve())
    res = f"{settings.output_resolution_mm:g}"
    thick = [f"{t:g}" for t in thicknesses] if thicknesses else []
    if settings.tool == "nesvor":
        cmd = ["reconstruct", "--input-stacks", *stacks, "--stack-masks", *masks, "--output-volume", output,
               "--output-resolution", res, "--registration", settings.registration]
        if thick:
            cmd += ["--thicknesses", *thick]
    elif settings.tool == "svrtk":
        # SVRTK takes one mask, in the space of the template stack (the first one).
        cmd = ["reconstruct", output, str(len(stacks)), *stacks, "-mask", masks[0], "-resolution", res]
        if thick:
            cmd += ["-thickness", *thick]
    else:  # niftymic: the slice thickness is taken from the stacks' spacing
        cmd = ["--filenames", *stacks, "--filenames-masks", *masks, "--output", output, "--isotropic-resolution", res]
    return [*settings.program, *cmd, *settings.options]


def run_external(settings: ExternalSettings, stacks: Sequence[str], masks: Sequence[str],
                 thicknesses: Sequence[float] | None, output_volume: str) -> float:
    """Run the tool, convert its volume to ``output_volume`` (atomically); returns the tool's wall time (s)."""
    from gsvr.io.nifti import check_writable, load_image, save_volume

    why = availability(settings)
    if why:
        raise GsvrError(f"{settings.tool}: {why}")
    check_writable(output_volume)
    with tempfile.TemporaryDirectory(prefix=f"gsvr-{settings.tool}-", dir=Path(output_volume).parent) as scratch:
        raw = str(Path(scratch) / "volume.nii.gz")
        cmd = build_command(settings, stacks, masks, thicknesses, raw)
        log.info("running %s", " ".join(cmd))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=scratch, capture_output=True, text=True)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise GsvrError(f"{settings.tool} exited with status {proc.returncode}: {tail[0]}")
        data, affine = load_image(raw, what=f"{settings.tool} output")
        save_volume(output_volume, data, affine)
    log.info("%s finished in %.1f s", settings.tool, elapsed)
    return elapsed


__all__ = ["ExternalSettings", "PROGRAMS", "availability", "build_command", "run_external"]
