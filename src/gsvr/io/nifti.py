"""Reading stacks and masks, writing volumes.

A stack is a 3D NIfTI image whose third voxel axis indexes slices. Its voxel-to-world
affine comes from the sform (qform when the sform code is 0); nibabel already returns
RAS+ millimetres, so no LPS conversion happens here. Images are written through a
temporary name and renamed at the end, so a failure never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import socket
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import nibabel as nib
import numpy as np

from gsvr.errors import GsvrError

log = logging.getLogger(__name__)

#: Mask and stack grids closer than this (mm, on any affine entry, in world space) are the same grid.
GRID_TOLERANCE_MM = 1e-3
#: NIfTI xform code written for both sform and qform: "scanner-based anatomical coordinates".
XFORM_SCANNER = 1


@dataclass
class Stack:
    """One acquired stack of 2D slices.

    Attributes:
        data: [X, Y, Z] float32 intensities; slices are data[:, :, k].
        mask: [X, Y, Z] bool brain mask on the same grid.
        affine: [4, 4] float64 voxel -> world (RAS+ mm).
        thickness_mm: slice thickness (FWHM of the through-plane PSF).
        name: the stack's short name (its file name; for logs and tables).
        alignment: [4, 4] rigid world transform that stack alignment applied to the header
            (``affine`` = alignment @ the input affine); None when the stack was not moved.
        path: the file it was read from, as given (None for a stack made in memory).
    """

    data: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    thickness_mm: float
    name: str = "stack"
    alignment: np.ndarray | None = None
    path: str | None = None

    @property
    def label(self) -> str:
        """What an error message names: the file as given (folder included), else the name."""
        return self.path or self.name

    @property
    def spacing_mm(self) -> np.ndarray:
        """[3] voxel spacing: in-plane x, in-plane y, slice spacing."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def n_slices(self) -> int:
        return int(self.data.shape[2])


def load_image(path: str | os.PathLike, *, what: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Load a 3D NIfTI image as (float32 data [X, Y, Z], float64 affine [4, 4]).

    Raises:
        GsvrError: missing, unreadable (not NIfTI, truncated), not 3D, or non-finite voxels.
    """
    path = Path(path)
    if path.is_dir():
        raise GsvrError(f"{path}: {what} is a folder, not a NIfTI file")
    if not path.is_file():
        raise GsvrError(f"{path}: {what} file does not exist")
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise GsvrError(f"{path}: {what} is not a NIfTI image (got {type(img).__name__})")
        data = np.asanyarray(img.dataobj)
    except GsvrError:
        raise
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error) as exc:
        raise GsvrError(f"{path}: cannot read {what} as NIfTI ({exc.__class__.__name__}: {exc})") from exc
    shape = data.shape
    if data.ndim == 4 and shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise GsvrError(f"{path}: {what} must be a 3D image, got shape {tuple(shape)}")
    data = np.asarray(data, dtype=np.float32)
    if not np.isfinite(data).all():
        n_bad = int((~np.isfinite(data)).sum())
        raise GsvrError(f"{path}: {what} has {n_bad} NaN/Inf voxels")
    if img.get_sform(coded=True)[1] == 0 and img.get_qform(coded=True)[1] == 0:
        warnings.warn(f"{path}: {what} has no orientation in its header (sform and qform codes are both 0); "
                      "using the voxel sizes alone, so it may not line up with the other images", stacklevel=2)
    affine = image_affine(img)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise GsvrError(f"{path}: {what} has a singular voxel-to-world affine")
    return data, affine


def image_affine(img: nib.Nifti1Image) -> np.ndarray:
    """Voxel -> world (RAS+ mm): the sform where its code is set, else the qform."""
    sform, s_code = img.get_sform(coded=True)
    if sform is not None and s_code > 0:
        return np.asarray(sform, dtype=np.float64)
    qform, q_code = img.get_qform(coded=True)
    if qform is not None and q_code > 0:
        return np.asarray(qform, dtype=np.float64)
    return np.asarray(img.affine, dtype=np.float64)


def load_stack(
    stack_path: str | os.PathLike,
    mask_path: str | os.PathLike | None = None,
    thickness_mm: float | None = None,
) -> Stack:
    """Load one stack with its mask and slice thickness.

    The mask may sit on a grid that differs from the stack's: up to GRID_TOLERANCE_MM it is
    taken as is; beyond, it is resampled nearest-neighbour onto the stack grid with a warning.

    Args:
        stack_path: the stack NIfTI.
        mask_path: its brain mask (None: the whole stack).
        thickness_mm: slice thickness; None takes the spacing of the third voxel axis.
    """
    data, affine = load_image(stack_path, what="stack")
    order = slice_axis_order(affine)
    if data.shape[order[2]] < 2:
        raise GsvrError(f"{stack_path}: stack has {data.shape[order[2]]} slice(s); a stack needs at least 2 slices")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[order]
    if thickness_mm is None:
        thickness_mm = float(spacing[2])
    if not np.isfinite(thickness_mm) or thickness_mm <= 0:
        raise GsvrError(f"{stack_path}: slice thickness must be > 0 mm, got {thickness_mm}")
    if mask_path is None:
        mask = np.ones(data.shape, dtype=bool)
    else:
        mask = load_mask(mask_path, data.shape, affine)
    if order != [0, 1, 2]:
        warnings.warn(f"{stack_path}: its slices lie along voxel axis {order[2]} (the largest spacing, "
                      f"{spacing[2]:.2f} mm); reoriented so that they are the third axis", stacklevel=2)
        data, mask = np.transpose(data, order), np.transpose(mask, order)
        affine = affine.copy()
        affine[:3, :3] = affine[:3, :3][:, order]
    if not mask.any():
        raise GsvrError(f"{mask_path}: mask is empty (no voxel > 0 on the stack grid of {stack_path})")
    return Stack(data=data, mask=mask, affine=affine, thickness_mm=float(thickness_mm), name=Path(stack_path).name,
                 path=str(stack_path))


def load_mask(path: str | os.PathLike, shape: Sequence[int], affine: np.ndarray, *, what: str = "mask") -> np.ndarray:
    """A mask file as a boolean array on the grid (``shape``, ``affine``) of its image: binarised at 0.5 (with a
    warning when it holds values strictly between 0 and 1), through world coordinates when its grid differs
    (see :func:`match_mask_to_stack`)."""
    data, mask_affine = load_image(path, what=what)
    if not (data > 0.5).any():  # before any resampling warning: the error is the one line
        raise GsvrError(f"{path}: {what} is empty (no voxel > 0.5)")
    fractional = (data > 0) & (data < 1)
    if fractional.any():
        warnings.warn(f"{path}: {what} is not binary ({int(fractional.sum())} voxels strictly between 0 and 1); "
                      "binarised at 0.5", stacklevel=3)
    return match_mask_to_stack(data > 0.5, mask_affine, shape, affine, mask_path=path)


def slice_axis_order(affine: np.ndarray) -> list[int]:
    """Voxel axes with the slice axis (the largest spacing, where it is clearly larger than the third
    axis's) last: [0, 1, 2] for a stack stored as gsvr expects it."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    axis = int(np.argmax(spacing))
    if axis == 2 or spacing[axis] <= 1.01 * spacing[2]:
        return [0, 1, 2]
    return [a for a in range(3) if a != axis] + [axis]


def same_grid(shape: Sequence[int], affine: np.ndarray, other_shape: Sequence[int], other_affine: np.ndarray) -> bool:
    """Whether two images share their voxel grid: the same shape, affines within ``GRID_TOLERANCE_MM``."""
    return tuple(shape) == tuple(other_shape) and float(np.abs(np.asarray(affine) - other_affine).max()) < GRID_TOLERANCE_MM


def match_mask_to_stack(
    mask: np.ndarray, mask_affine: np.ndarray, shape: Sequence[int], affine: np.ndarray, *, mask_path: object
) -> np.ndarray:
    """Return the mask on the stack grid (as is, or resampled nearest-neighbour)."""
    if same_grid(mask.shape, mask_affine, shape, affine):
        return mask
    # Resample: world position of each stack voxel -> mask voxel index (nearest).
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    mask_ijk = np.rint((world - mask_affine[:3, 3]) @ np.linalg.inv(mask_affine[:3, :3]).T).astype(np.int64)
    inside = np.all((mask_ijk >= 0) & (mask_ijk < np.array(mask.shape)), axis=1)
    out = np.zeros(len(ijk), dtype=bool)
    out[inside] = mask[tuple(mask_ijk[inside].T)]
    out = out.reshape(shape)
    if mask.any() and not out.any():
        raise GsvrError(f"{mask_path}: mask grid does not overlap its stack in world space (the mask header does not match the stack)")
    warnings.warn(
        f"{mask_path}: mask grid differs from its stack's by more than {GRID_TOLERANCE_MM} mm; "
        "resampled nearest-neighbour onto the stack grid",
        stacklevel=2,
    )
    return out


def load_stacks(
    stack_paths: Sequence[str | os.PathLike],
    mask_paths: Sequence[str | os.PathLike] | None = None,
    thicknesses_mm: Sequence[float] | None = None,
) -> list[Stack]:
    """Load several stacks; the lists of masks and thicknesses must match the stacks one to one."""
    if not stack_paths:
        raise GsvrError("no input stacks given")
    n = len(stack_paths)
    if mask_paths and len(mask_paths) != n:
        raise GsvrError(f"{n} stacks but {len(mask_paths)} masks: give one mask per stack, in the same order")
    if thicknesses_mm and len(thicknesses_mm) != n:
        raise GsvrError(f"{n} stacks but {len(thicknesses_mm)} thicknesses: give one thickness per stack, in the same order")
    return [
        load_stack(
            stack_paths[i],
            mask_paths[i] if mask_paths else None,
            thicknesses_mm[i] if thicknesses_mm else None,
        )
        for i in range(n)
    ]


def check_writable(path: str | os.PathLike) -> None:
    """Fail early (before any work) when ``path`` cannot be written."""
    if Path(path).is_dir():
        raise GsvrError(f"{path}: is a folder; give a file name")
    parent = Path(path).parent
    if not parent.is_dir():
        raise GsvrError(f"{path}: output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise GsvrError(f"{path}: output folder {parent} is not writable")


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def check_outputs(outputs: dict[str, str | os.PathLike | None], *, inputs: Sequence[str | os.PathLike] = (),
                  nifti: Sequence[str] = ()) -> None:
    """Fail before any work: each output (flag -> path; None: not asked for) must be a writable file path,
    the ``nifti`` ones named .nii or .nii.gz, no two the same file, and none of them one of the ``inputs``."""
    given = {flag: Path(p) for flag, p in outputs.items() if p}
    for flag, path in given.items():
        check_writable(path)
        if flag in nifti and not path.name.endswith(NIFTI_SUFFIXES):
            raise GsvrError(f"{path}: {flag} must be a NIfTI file name ending in .nii or .nii.gz")
    seen: dict[Path, str] = {}
    for flag, path in given.items():
        key = path.resolve()
        if key in seen:
            raise GsvrError(f"{path}: given to both {seen[key]} and {flag}; each output needs its own file")
        seen[key] = flag
    for flag, path in given.items():
        if overwritten_input(path, inputs) is not None:
            raise GsvrError(f"{path}: {flag} names an input file; it would be overwritten")


def overwritten_input(output: str | os.PathLike, inputs: Sequence[str | os.PathLike]) -> Path | None:
    """The input that writing ``output`` would overwrite (the same path, or the same file under another name), or None."""
    path = Path(output)
    for source in map(Path, inputs):
        if path.resolve() == source.resolve() or (path.exists() and source.exists() and os.path.samefile(path, source)):
            return source
    return None


_HOST = socket.gethostname().replace(".", "_")


def _sweep_stale_temporaries(path: Path) -> None:
    """Remove the temporaries of ``path`` left by a process of this host that no longer runs (killed with
    SIGKILL, or the machine lost power, so its own clean-up never ran). Named ``.NAME.HOST.PID.*.tmp*``."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.{_HOST}.*.tmp*"):
        pid = tmp.name[len(path.name) + len(_HOST) + 3:].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                tmp.unlink()
        except OSError:  # alive, another user's
            pass


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same extension); rename it onto ``path`` on success only."""
    path = Path(path)
    check_writable(path)
    parent = path.parent
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    _sweep_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=f".tmp{suffix}", dir=parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_outputs(paths: Sequence[str | os.PathLike | None]) -> Iterator[list[Path | None]]:
    """Temporary paths for several outputs (None stays None), each renamed onto its output only when the
    whole block completes: a failure while writing any of them leaves none written."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_output(p)) if p else None for p in paths]


def save_volume(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray) -> None:
    """Write a float32 NIfTI with the world affine in both sform and qform (atomic)."""
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    img.set_sform(affine, code=XFORM_SCANNER)
    img.set_qform(affine, code=XFORM_SCANNER)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_output(path) as tmp:
        nib.save(img, str(tmp))


def save_mask(path: str | os.PathLike, mask: np.ndarray, affine: np.ndarray, *, dtype=np.uint8) -> None:
    """Write a mask (uint8) or label map (``dtype=np.int16``) NIfTI (atomic)."""
    img = nib.Nifti1Image(np.asarray(mask, dtype=dtype), np.asarray(affine, dtype=np.float64))
    img.set_sform(affine, code=XFORM_SCANNER)
    img.set_qform(affine, code=XFORM_SCANNER)
    with atomic_output(path) as tmp:
        nib.save(img, str(tmp))
