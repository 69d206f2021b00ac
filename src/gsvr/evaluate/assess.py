"""Self-consistency for data without ground truth: leave one stack out.

One reconstruction from all stacks gives every slice's motion (or an earlier run's slice table does). For
each stack, a *fold* then reconstructs from all the others, starting from their motions in that run (no
stack alignment, one SVR cycle at the finest spacing: the registration is refined without the left-out
stack, and the volume is solved and fitted again from the other stacks only; :func:`fold_method` says where a gsvr
fold stops at the voxel volume its Gaussians would only be fitted to). The left-out stack is placed
on its volume by its pose in the full run (the rigid fit of its slices' motions), carried into the fold's frame
(the rigid map between the two runs' positions of the other stacks' slices: the SVR cycles pin the mean motion
of the slices they see to the headers), refined by a masked-correlation stack registration
(:func:`gsvr.preprocess.align.register_stack`), and its slices are simulated through the slice PSF
(Gauss-Hermite quadrature of the volume, trilinear) and compared with the acquired slices inside the stack's mask:

- ``ncc``: Pearson correlation of simulated and acquired pixels;
- ``psnr``: after a least-squares linear intensity fit of the simulation to the acquisition, with
  the acquisition's in-mask maximum as peak (the ground-truth protocol of :mod:`gsvr.evaluate.metrics`).

The left-out stack keeps its own slice motion, which the stack-level registration cannot remove, so
``ncc``/``psnr`` mix the volume's quality with that motion. ``ncc_slices``/``psnr_slices`` register
every left-out slice to the (fixed) volume first (the Gauss-Newton slice-to-volume registration of
the SVR cycles, 6 parameters per slice against hundreds of pixels, from the stack's pose and from the
full run's motion of the slice, the better kept) and fit each slice's intensity scale and offset, as the
acquisition model does: they measure how well the volume explains new slices. Both are comparable between
methods on the same data, not with ground-truth PSNR.

What the full run leaks into a fold: the other stacks' motions were estimated with the left-out stack in the
volume (the fold's SVR cycle refines them without it), and the left-out stack's pose starts the registration.
The fold's volume itself never sees the left-out stack's pixels. Starting from the full run's motions is what
makes a fold cheap (a fraction of a reconstruction) and lets the left-out stack be placed however far it was
turned, which a registration of a volume to a thick-slice stack from its header does not (about 20 deg
turns stopped at 4-9 deg).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation

from gsvr.errors import GsvrError
from gsvr.io.nifti import Stack
from gsvr.ops.psf import psf_sigmas_mm
from gsvr.ops.voxel import VoxelGrid, psf_nodes
from gsvr.evaluate.motion import apply, kabsch
from gsvr.recon.config import ReconConfig, SvrSettings
from gsvr.recon.slices import SliceMotion, build_slice_data, read_slice_table, set_header_motion, slice_axes, table_motion
from gsvr.recon.svr import SliceOperator, register

log = logging.getLogger(__name__)

#: Columns of the table :func:`assess_stacks` returns (one row per left-out stack, then the mean).
ASSESS_COLUMNS = ["stack", "ncc", "psnr", "ncc_slices", "psnr_slices", "n_pixels", "registration_rotation_deg", "registration_translation_mm",
                  "reconstruct_s"]


def simulate_stack(volume: np.ndarray, volume_affine: np.ndarray, stack: Stack, transform: np.ndarray | None = None,
                   *, chunk: int = 65536) -> np.ndarray:
    """The in-mask pixels of ``stack`` as the volume would produce them: each pixel is the volume
    integrated against the slice PSF (3x3x3 Gauss-Hermite nodes, trilinear reads, 0 outside).

    Args:
        volume: [I, J, K] voxel values; ``volume_affine`` its voxel -> world affine.
        stack: the stack whose slices are simulated (its header geometry, PSF from spacing and thickness).
        transform: [4, 4] rigid world transform taking volume anatomy onto the stack's (None: identity).

    Returns:
        [P] simulated values, in the order of ``np.argwhere(stack.mask)``.
    """
    ax = slice_axes(stack.affine)
    sp = stack.spacing_mm
    sigma = np.array(psf_sigmas_mm((sp[0], sp[1]), stack.thickness_mm))
    nodes, weights = psf_nodes(3, 3, dtype=torch.float64)
    offsets = (nodes.numpy() * sigma) @ ax.T  # [S, 3] world offsets of the PSF nodes
    to_volume = np.linalg.inv(volume_affine) @ np.linalg.inv(transform if transform is not None else np.eye(4))
    ijk = np.argwhere(stack.mask).astype(np.float64)
    world = ijk @ stack.affine[:3, :3].T + stack.affine[:3, 3]
    vol = torch.as_tensor(np.ascontiguousarray(volume), dtype=torch.float32)[None, None]
    extent = torch.tensor([n - 1 for n in volume.shape], dtype=torch.float64).clamp_min(1)
    out = np.empty(len(ijk), dtype=np.float64)
    for lo in range(0, len(ijk), chunk):
        pts = world[lo:lo + chunk, None, :] + offsets[None]  # [p, S, 3]
        vox = torch.as_tensor(pts @ to_volume[:3, :3].T + to_volume[:3, 3])
        grid = (2.0 * vox / extent - 1.0).flip(-1).float()  # grid_sample wants (k, j, i) in [-1, 1]
        vals = F.grid_sample(vol, grid[None, :, :, None, :], mode="bilinear", padding_mode="zeros", align_corners=True)
        out[lo:lo + chunk] = (vals[0, 0, :, :, 0].double() * weights).sum(-1).numpy()
    return out


def compare_pixels(simulated: np.ndarray, acquired: np.ndarray) -> tuple[float, float]:
    """(NCC, PSNR) of simulated against acquired pixels (PSNR after a linear intensity fit)."""
    if simulated.std() == 0 or acquired.std() == 0:
        return 0.0, float("nan")
    ncc = float(np.corrcoef(simulated, acquired)[0, 1])
    design = np.stack([simulated, np.ones_like(simulated)], 1)
    (a, b), *_ = np.linalg.lstsq(design, acquired, rcond=None)
    mse = float(np.mean((a * simulated + b - acquired) ** 2))
    peak = float(acquired.max())
    return ncc, float(10 * np.log10(peak * peak / max(mse, 1e-30)))


def assess_stacks(stacks: Sequence[Stack], config: ReconConfig | None = None, *, method: str = "gsvr",
                  progress: bool = True, full_motion: pd.DataFrame | None = None, full_folds: bool = False) -> pd.DataFrame:
    """Leave-one-stack-out table (``ASSESS_COLUMNS``): one row per stack, then a row ``mean``.

    ``full_motion``: the slice table (``slices.tsv``) of a reconstruction of these stacks with this method and
    config; without it, that reconstruction is made first. ``full_folds``: every fold runs the whole method, also
    where :func:`fold_method` would stop a gsvr fold at the voxel volume its Gaussians are fitted to.
    """
    from gsvr.recon.files import METHODS

    cfg = config or ReconConfig()
    if len(stacks) < 2:
        raise GsvrError(f"{stacks[0].label if stacks else 'no stack'}: leave-one-stack-out assessment needs at least 2 stacks")
    if method not in METHODS:
        raise GsvrError(f"unknown method {method!r}; known: {sorted(METHODS)}")
    if full_motion is None:
        t0 = time.perf_counter()
        log.info("assess: reconstructing from all %d stacks", len(stacks))
        full_motion = METHODS[method](stacks, cfg, progress=progress).slices
        log.info("assess: full reconstruction in %.1f s", time.perf_counter() - t0)
    fold_cfg = fold_config(cfg, method)
    fold_engine = method if full_folds else fold_method(cfg, method)
    if fold_engine != method:
        log.info("assess: the folds stop at the voxel volume the Gaussians are fitted to (--full-folds: fit them too)")
    rows = []
    for i, left_out in enumerate(stacks):
        t0 = time.perf_counter()
        others = [s for j, s in enumerate(stacks) if j != i]
        log.info("assess: reconstructing without %s (%d/%d)", left_out.name, i + 1, len(stacks))
        others_motion = fold_motion(full_motion, i)
        if method == "stack_average":  # header geometry: the full run's frame already
            result = METHODS[method](others, cfg, progress=progress)
        else:
            result = METHODS[fold_engine](others, fold_cfg, progress=progress, initial_motion=others_motion)
        elapsed = time.perf_counter() - t0
        vol = result.volume
        # The fold keeps its own frame (the SVR cycles pin the mean motion of *its* slices to the headers): carry the
        # left-out stack's full-run pose over by the rigid map between the two runs' positions of the other slices.
        to_fold = frame_change(others_motion, result.slices, others)
        acquired = left_out.data[left_out.mask].astype(np.float64)
        # Stack level: the full run's pose, refined; or (with stack alignment) a multi-start search from the header,
        # where the full run failed to place the stack. The better correlation wins.
        starts = [to_fold @ stack_pose(full_motion, left_out, i)] + ([None] if cfg.align is not None else [])
        fits = []
        for start in starts:
            search = cfg.align.max_angle_deg if start is None else 0.0
            tx = _register(vol.data, vol.affine, left_out, start, cfg.run.seed, max_angle_deg=search)
            fits.append((compare_pixels(simulate_stack(vol.data, vol.affine, left_out, tx), acquired), tx))
        (ncc, psnr), tx = max(fits, key=lambda f: f[0][0])
        # Slice level: each slice from the full run's motion of it, or from the stack's pose; the better fit wins.
        maps = slice_maps(full_motion[full_motion["stack_index"] == i])
        ncc_s, psnr_s = slice_registered_fit(vol.data, vol.affine, left_out, tx, cfg,
                                             slice_starts={z: to_fold @ m for z, m in maps.items()})
        angle = float(np.degrees(Rotation.from_matrix(tx[:3, :3]).magnitude()))
        rows.append((left_out.name, ncc, psnr, ncc_s, psnr_s, len(acquired), angle, float(np.linalg.norm(tx[:3, 3])), elapsed))
        log.info("assess: %s left out: NCC %.3f, PSNR %.2f dB; slices registered: NCC %.3f, PSNR %.2f dB",
                 left_out.name, ncc, psnr, ncc_s, psnr_s)
    table = pd.DataFrame(rows, columns=ASSESS_COLUMNS)
    mean = table.drop(columns="stack").mean()
    mean["n_pixels"] = table["n_pixels"].sum()
    return pd.concat([table, pd.DataFrame([{"stack": "mean", **mean.to_dict()}])], ignore_index=True)


def fold_config(cfg: ReconConfig, method: str = "gsvr") -> ReconConfig:
    """The settings of a fold: ``cfg`` without stack alignment, with one SVR cycle at its finest spacing that
    registers slices (the motions start from the full run's). gsvr without SVR cycles (``svr: null``, the joint
    stage from the headers) keeps none; svr_classic always runs cycles (defaults when null)."""
    svr = cfg.svr if cfg.svr is not None or method != "svr_classic" else SvrSettings()
    svr = svr and dataclasses.replace(svr, spacings_mm=svr.spacings_mm[-1:], stack_spacings_mm=(), translation_only_cycles=0)
    return dataclasses.replace(cfg, align=None, svr=svr)


def fold_method(cfg: ReconConfig, method: str = "gsvr") -> str:
    """The method a fold reconstructs with: ``method``, except gsvr whose Gaussians are fitted to a voxel volume that
    svr_classic makes the same way (the output-grid super-resolution, no joint step on the slices, no coarse joint
    level): its folds stop at that volume, svr_classic's. The fit adds a representation error, not information from
    the slices (docs/results.md section 12 measures both ways); the refinement adds what the slices say, but with its
    split it would more than double a fold's time, so a default fold scores the volume it starts from (docs/method.md,
    "Quality without ground truth")."""
    refits = (method == "gsvr" and cfg.svr_cycles_run and cfg.fits_output_volume and cfg.joint.steps == 0
              and cfg.joint.multires is None)
    return "svr_classic" if refits else method


def check_full_run(table: pd.DataFrame, stacks: Sequence[Stack], source: str) -> None:
    """Refuse a slice table that is not of a run of these stacks (in this order): stack names, slice indices in
    range, one row per slice, a row for every slice with mask. Errors name ``source``."""
    keys = table[["stack_index", "slice_index"]]
    if not np.all(np.mod(keys.to_numpy(float), 1) == 0):
        raise GsvrError(f"{source}: stack_index and slice_index must be whole numbers")
    found = sorted(set(table["stack_index"].astype(int)))
    if found != list(range(len(stacks))):
        raise GsvrError(f"{source}: its slices come from stacks {found}, not from the {len(stacks)} stacks given "
                        f"(0..{len(stacks) - 1}): a slices.tsv of another run")
    if keys.duplicated().any():
        raise GsvrError(f"{source}: more than one row for a slice (e.g. stack {keys[keys.duplicated()].iloc[0].tolist()})")
    for k, stack in enumerate(stacks):
        rows = table[table["stack_index"] == k]
        if "stack" in rows and (rows["stack"].astype(str) != stack.name).any():
            raise GsvrError(f"{source}: stack {k} is {rows['stack'].iloc[0]} there, {stack.name} here: give the stacks "
                            "in the order of that run")
        have = set(rows["slice_index"].astype(int))
        need = set(np.flatnonzero(stack.mask.any(axis=(0, 1))).tolist())
        outside = sorted(z for z in have if not 0 <= z < stack.data.shape[2])
        if outside or not need <= have:
            what = f"slice {outside[0]} outside" if outside else f"no row for slice {min(need - have)} of"
            raise GsvrError(f"{source}: {what} {stack.label} ({stack.data.shape[2]} slices): a slices.tsv of another run")


def fold_motion(table: pd.DataFrame, left_out: int) -> pd.DataFrame:
    """The slice table without stack ``left_out``, its stack indices those of the remaining stacks."""
    rest = table[table["stack_index"] != left_out].copy()
    rest["stack_index"] -= (rest["stack_index"] > left_out).astype(int)
    return rest


def stack_pose(table: pd.DataFrame, stack: Stack, index: int, *, min_weight: float = 0.5) -> np.ndarray:
    """The rigid world map [4, 4] from the stack's header world to the anatomy that fits its slices' motions
    best (least squares over the in-mask pixels of the slices the table weights at least ``min_weight``, all
    slices if none is): where the run put the stack as a whole."""
    rows = _kept(table[table["stack_index"] == index], min_weight)
    rot, centre, trans = table_motion(rows)
    src, dst = [], []
    for k, slice_index in enumerate(rows["slice_index"].to_numpy(int)):
        pts = _slice_pixels(stack, slice_index)
        src.append(pts)
        dst.append(apply(rot[k], centre[k], trans[k], pts))
    return _rigid(src, dst)


def frame_change(before: pd.DataFrame, after: pd.DataFrame, stacks: Sequence[Stack], *, min_weight: float = 0.5) -> np.ndarray:
    """The rigid world map [4, 4] from the anatomy frame of one run to that of another run of the same stacks (slice
    tables ``before`` and ``after``, the same stack indices): least squares over the in-mask pixels of the slices
    ``after`` weights at least ``min_weight``."""
    rows = _kept(after, min_weight)
    keyed = before.set_index(["stack_index", "slice_index"])
    matched = keyed.loc[list(zip(rows["stack_index"], rows["slice_index"]))].reset_index()
    r_a, c_a, t_a = table_motion(rows)
    r_b, c_b, t_b = table_motion(matched)
    src, dst = [], []
    for k, (stack_index, slice_index) in enumerate(zip(rows["stack_index"].to_numpy(int), rows["slice_index"].to_numpy(int))):
        pts = _slice_pixels(stacks[stack_index], slice_index)
        src.append(apply(r_b[k], c_b[k], t_b[k], pts))
        dst.append(apply(r_a[k], c_a[k], t_a[k], pts))
    return _rigid(src, dst)


def _kept(rows: pd.DataFrame, min_weight: float) -> pd.DataFrame:
    """The rows weighted at least ``min_weight`` (all rows when none is, or without weights)."""
    if "weight" in rows and (rows["weight"] >= min_weight).any():
        return rows[rows["weight"] >= min_weight]
    return rows


def _slice_pixels(stack: Stack, slice_index: int, step: int = 4) -> np.ndarray:
    """World positions [P, 3] (input header) of every ``step``-th in-mask pixel of one slice."""
    ij = np.argwhere(stack.mask[:, :, slice_index])[::step].astype(np.float64)
    ijk = np.c_[ij, np.full(len(ij), float(slice_index))]
    return ijk @ stack.affine[:3, :3].T + stack.affine[:3, 3]


def _rigid(src: list[np.ndarray], dst: list[np.ndarray]) -> np.ndarray:
    """[4, 4] rigid map minimising the squared distances of the point sets (identity with fewer than 3 points)."""
    pose = np.eye(4)
    if src and sum(map(len, src)) >= 3:
        pose[:3, :3], pose[:3, 3] = kabsch(np.concatenate(src), np.concatenate(dst))
    return pose


def assess_files(stacks: Sequence[str], masks: Sequence[str] | None, thicknesses: Sequence[float] | None,
                 config: ReconConfig, *, method: str = "gsvr", output_tsv: str | None = None,
                 progress: bool = True, full_motion_tsv: str | None = None,
                 other_inputs: Sequence[str] = (), full_folds: bool = False) -> pd.DataFrame:
    """Load the stacks, run :func:`assess_stacks` (``full_motion_tsv``: the ``slices.tsv`` of a reconstruction of
    these stacks, which the folds then start from), write the table (atomically) when asked. Before any work,
    ``output_tsv`` must be a writable file path that is none of the inputs (``other_inputs``: files read besides
    the stacks, masks and slice table, e.g. a config file)."""
    from gsvr.io import load_stacks
    from gsvr.io.nifti import atomic_output, check_outputs

    inputs = [*stacks, *(masks or ()), *([full_motion_tsv] if full_motion_tsv else []), *other_inputs]
    check_outputs({"--output-tsv": output_tsv}, inputs=inputs)
    full_motion = read_slice_table(full_motion_tsv) if full_motion_tsv else None
    loaded = load_stacks(stacks, masks, thicknesses)
    if full_motion is not None:
        check_full_run(full_motion, loaded, str(full_motion_tsv))
    table = assess_stacks(loaded, config, method=method, progress=progress, full_motion=full_motion, full_folds=full_folds)
    if output_tsv:
        with atomic_output(output_tsv) as tmp:
            table.to_csv(tmp, sep="\t", index=False, float_format="%.5g")
    return table


def slice_registered_fit(volume: np.ndarray, affine: np.ndarray, stack: Stack, transform: np.ndarray,
                         cfg: ReconConfig, *, slice_starts: dict[int, np.ndarray] | None = None) -> tuple[float, float]:
    """(NCC, PSNR) of the stack's slices against the volume after slice-to-volume registration of each
    slice (the volume fixed; ``transform`` the stack-level start: volume anatomy -> stack world). With
    ``slice_starts`` (slice index -> [4, 4] map from the stack's header world to the volume's anatomy, e.g. a
    run's motion of that slice) each slice is also registered from its own start, and keeps the start whose
    registration ends with the higher correlation. Each slice's simulation then gets its own linear intensity
    fit (:func:`per_slice_intensity_fit`). The volume must sit on an axis-aligned grid (every gsvr
    reconstruction does)."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.allclose(affine[:3, :3], np.diag(spacing), atol=1e-6) or not np.allclose(spacing, spacing[0]):
        raise GsvrError("slice-level assessment needs an isotropic axis-aligned volume grid")
    # The stack moved onto the volume as a whole: the registration's prior holds each slice near that pose.
    moved = Stack(data=stack.data, mask=stack.mask, affine=np.linalg.inv(transform) @ stack.affine,
                  thickness_mm=stack.thickness_mm, name=stack.name)
    dev = torch.device("cpu")
    data = build_slice_data([moved], quantile=cfg.preprocess.normalize_quantile, device=dev)
    grid = VoxelGrid(tuple(float(v) for v in affine[:3, 3] - data.origin_mm), float(spacing[0]), tuple(volume.shape))
    vol = torch.as_tensor(np.ascontiguousarray(volume), dtype=torch.float32)
    vol = vol / vol.abs().max().clamp_min(1e-12)
    settings = cfg.svr or SvrSettings()
    best_ncc, best_pred = None, None
    for starts in [None] + ([slice_starts] if slice_starts else []):
        motion = SliceMotion(data.n_slices, dev)
        if starts is not None:  # each slice's start as a motion of the moved stack: x_moved = T^-1 x
            maps = np.stack([starts.get(int(z), np.linalg.inv(transform)) @ transform for z in data.slice_in_stack])
            set_header_motion(data, motion, [moved], maps[:, :3, :3], np.zeros((len(maps), 3)), maps[:, :3, 3])
        ncc = register(vol, grid, data, motion, settings)
        pred = SliceOperator(data, motion, grid, settings, torch.arange(data.n_pixels)).forward(vol)
        if best_ncc is None:
            best_ncc, best_pred = ncc, pred
        else:
            better = ncc > best_ncc
            best_pred = torch.where(better[data.slice_idx], pred, best_pred)
            best_ncc = torch.where(better, ncc, best_ncc)
    fitted = per_slice_intensity_fit(best_pred.double(), data.y.double(), data.slice_idx, data.n_slices)
    return compare_pixels(fitted.numpy(), data.y.double().numpy())


def per_slice_intensity_fit(pred: torch.Tensor, y: torch.Tensor, slice_idx: torch.Tensor, n_slices: int, *,
                            min_pixels: int = 20) -> torch.Tensor:
    """``pred`` [P] mapped by each slice's least-squares linear intensity fit to ``y`` [P] (the acquisition model's
    slice intensity scale, and an offset): two parameters per slice against its hundreds of pixels; slices with
    fewer than ``min_pixels`` pixels get the fit over all pixels."""
    n = torch.bincount(slice_idx, minlength=n_slices).double().clamp_min(1)

    def mean(v: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_slices, dtype=v.dtype).index_add_(0, slice_idx, v) / n

    mp, my = mean(pred), mean(y)
    var = (mean(pred * pred) - mp * mp).clamp_min(1e-12)
    a = (mean(pred * y) - mp * my) / var
    b = my - a * mp
    # A slice with few pixels (a brain edge) would fit almost exactly: it gets the stack-wide fit instead.
    few = n < min_pixels
    a_all = ((pred - pred.mean()) * (y - y.mean())).mean() / (pred.var(unbiased=False).clamp_min(1e-12))
    a = torch.where(few, a_all, a)
    b = torch.where(few, y.mean() - a_all * pred.mean(), b)
    return a[slice_idx] * pred + b[slice_idx]


def slice_maps(table: pd.DataFrame) -> dict[int, np.ndarray]:
    """slice index -> [4, 4] map (header world -> anatomy) of each row of a one-stack slice table."""
    rot, centre, trans = table_motion(table)
    maps = {}
    for k, z in enumerate(table["slice_index"].to_numpy(int)):
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = rot[k], centre[k] + trans[k] - rot[k] @ centre[k]
        maps[int(z)] = m
    return maps


def _register(volume: np.ndarray, affine: np.ndarray, stack: Stack, pose: np.ndarray | None, seed: int, *,
              max_angle_deg: float = 0.0) -> np.ndarray:
    """Rigid transform taking the volume's anatomy onto the stack's (world, RAS): the inverse of the stack's
    ``pose`` (header world -> anatomy; None: the header itself), refined by a stack registration of the volume
    to the stack placed there (a multi-start over rotations up to ``max_angle_deg``)."""
    from gsvr.preprocess.align import register_stack

    positive = volume[volume > 0]
    if positive.size == 0:
        raise GsvrError(f"{stack.label}: the reconstruction without this stack is empty")
    support = volume > 0.05 * np.quantile(positive, 0.99)
    spacing = float(np.linalg.norm(affine[:3, 0]))
    as_stack = Stack(data=volume.astype(np.float32), mask=support, affine=affine, thickness_mm=spacing, name="volume")
    pose = np.eye(4) if pose is None else pose
    placed = dataclasses.replace(stack, affine=pose @ stack.affine)
    refine, _ = register_stack(placed, as_stack, max_angle_deg=max_angle_deg, seed=seed)  # volume -> placed stack
    return np.linalg.inv(pose) @ refine


__all__ = ["ASSESS_COLUMNS", "assess_files", "assess_stacks", "compare_pixels", "fold_config", "fold_motion", "frame_change",
           "check_full_run", "fold_method", "per_slice_intensity_fit", "simulate_stack", "slice_maps", "slice_registered_fit", "stack_pose"]
