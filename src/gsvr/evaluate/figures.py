"""Figures of the workflow: a tri-planar panel per subject and convergence curves per method."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
import SimpleITK as sitk

from gsvr.evaluate.metrics import to_sitk
from gsvr.io.nifti import atomic_output


def _save(fig, output_png: str | Path, title: str) -> None:
    """Title, tight layout and an atomic PNG write; the figure is closed."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_output(output_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _on_reference(path: str | Path, reference: sitk.Image) -> np.ndarray:
    """A NIfTI volume resampled (linear, through world coordinates) onto the reference grid -> [X, Y, Z]."""
    img = nib.load(str(path))
    moving = to_sitk(np.asarray(img.dataobj, dtype=np.float32), img.affine)
    out = sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkLinear, 0.0)
    return np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))


def triplanar_panel(columns: Sequence[tuple[str, str | Path]], reference_volume: str | Path, reference_mask: str | Path,
                    output_png: str | Path, *, title: str = "") -> None:
    """Axial, coronal and sagittal planes through the mask centre, one column per volume.

    Every volume is resampled onto the ground-truth grid through world coordinates (no
    registration: what is shown is where each method puts the anatomy) and scaled by its own
    99th percentile inside the mask.

    Args:
        columns: (label, NIfTI path) per column, e.g. ground truth, an input stack, each method.
        reference_volume: the grid everything is shown on (the ground truth).
        reference_mask: brain mask on that grid (for the centre and the intensity scale).
        output_png: written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref_img = nib.load(str(reference_volume))
    reference = to_sitk(np.asarray(ref_img.dataobj, dtype=np.float32), ref_img.affine)
    mask = _on_reference(reference_mask, reference) > 0.5
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0) + 1
    centre = ((lo + hi) // 2).astype(int)
    box = tuple(slice(max(a - 4, 0), b + 4) for a, b in zip(lo, hi))
    planes = [("axial", 2), ("coronal", 1), ("sagittal", 0)]
    fig, axes = plt.subplots(len(planes), len(columns), figsize=(2.2 * len(columns), 2.2 * len(planes)), squeeze=False)
    for c, (label, path) in enumerate(columns):
        vol = _on_reference(path, reference)
        inside = vol[mask]
        scale = float(np.percentile(inside, 99)) if inside.size and np.percentile(inside, 99) > 0 else 1.0
        for r, (name, axis) in enumerate(planes):
            cut = np.take(vol[box], centre[axis] - box[axis].start, axis=axis) / scale
            ax = axes[r, c]
            ax.imshow(np.rot90(cut), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    _save(fig, output_png, title)


def convergence_figure(logs: Mapping[str, str | Path], output_png: str | Path, *, title: str = "") -> None:
    """Each logged measure against wall time, one line per method (GSVR Fig. 2 layout).

    Args:
        logs: method -> per-step TSV written by ``--output-log`` (columns ``step, stage,
            elapsed_s, value, measure``); methods with an empty log are listed in the legend only.
        output_png: written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = {m: pd.read_csv(p, sep="\t") for m, p in logs.items()}
    measures = list(dict.fromkeys(x for df in frames.values() for x in df.get("measure", pd.Series(dtype=str))))
    fig, axes = plt.subplots(1, max(len(measures), 1), figsize=(4.2 * max(len(measures), 1), 3.2), squeeze=False)
    for i, measure in enumerate(measures):
        ax = axes[0, i]
        for method, df in frames.items():
            part = df[df["measure"] == measure]
            if len(part):
                ax.plot(part["elapsed_s"], part["value"], marker="o" if len(part) < 20 else None, ms=3, label=method)
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel(measure)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not measures:
        axes[0, 0].text(0.5, 0.5, "no logged steps", ha="center", va="center")
        axes[0, 0].set_axis_off()
    _save(fig, output_png, title)


def subject_figures(reference_volume: str | Path, reference_mask: str | Path, stack: str | Path,
                    volumes: Mapping[str, str | Path], logs: Mapping[str, str | Path], *, triplanar_png: str | Path,
                    convergence_png: str | Path, title: str = "") -> None:
    """The workflow's figures of one subject: the tri-planar panel (ground truth, one input stack, then
    each method's volume; :func:`triplanar_panel`) and the convergence curves of the methods' per-step
    logs (:func:`convergence_figure`). ``volumes`` and ``logs``: method -> path, in column order."""
    columns = [("ground truth", reference_volume), ("input stack 0", stack), *volumes.items()]
    triplanar_panel(columns, reference_volume, reference_mask, triplanar_png, title=title)
    convergence_figure(logs, convergence_png, title=title)
