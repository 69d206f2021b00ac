"""The ``gsvr`` command. Flag names follow NeSVoR's where they exist."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import warnings
from pathlib import Path

from gsvr import __version__
from gsvr.errors import GsvrError


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM and other schedulers send before killing a job), raised where the run is."""


def _terminate(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM unwinds the run like Ctrl-C (temporary outputs removed, the checkpoint kept) instead of
    killing the process on the spot."""
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave the signal alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    from gsvr.progress import logging_beside_bars

    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = ["gsvr", *argv]  # recorded in the provenance sidecar
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="gsvr: %(message)s")
    warnings.simplefilter("always", UserWarning)
    warnings.showwarning = lambda msg, *a, **k: print(f"gsvr: warning: {msg}", file=sys.stderr)
    try:
        with _sigterm_raises(), logging_beside_bars():
            return args.func(args)
    except (GsvrError, OSError) as exc:  # OSError: e.g. a full disk while writing (the outputs are written as a set)
        if args.debug:
            raise
        print(f"gsvr: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        ck = getattr(args, "checkpoint", None)
        hint = f"; continue with --resume --checkpoint {ck}" if ck and Path(ck).is_file() else ""
        print(f"gsvr: {'terminated (SIGTERM)' if terminated else 'interrupted'}; no output written{hint}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gsvr", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"gsvr {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("reconstruct", help="reconstruct a volume from motion-corrupted stacks (Gaussian engine)")
    _add_reconstruction_flags(r)
    r.add_argument("--output-model", metavar="PT", help="save Gaussians and motions for sample-volume")
    r.add_argument("--checkpoint", metavar="PT", help="write checkpoints here while running (removed on success)")
    r.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists (same result as an uninterrupted run)")
    r.set_defaults(func=_reconstruct, method="gsvr")

    c = sub.add_parser("svr", help="classical voxel-grid SVR (the svr_classic baseline), same inputs as reconstruct")
    _add_reconstruction_flags(c)
    c.set_defaults(func=_reconstruct, method="svr_classic", output_model=None, checkpoint=None, resume=False)

    a = sub.add_parser("assess", help="leave-one-stack-out self-consistency (data without ground truth)")
    _add_input_flags(a)
    a.add_argument("--method", choices=("gsvr", "svr_classic", "stack_average"), default="gsvr", help="reconstruction method assessed")
    a.add_argument("--output-tsv", metavar="TSV", help="one row per left-out stack, then the mean")
    a.add_argument("--full-run-slices", metavar="TSV",
                   help="slices.tsv of a reconstruction of these stacks with the same method and settings: the "
                        "left-out folds start from its motions (default: the assessment reconstructs from all stacks first)")
    a.add_argument("--full-folds", action="store_true",
                   help="fit Gaussians in every fold too (by default a gsvr fold whose Gaussians would only be fitted to "
                        "its voxel volume stops at that volume); needed to compare gsvr with svr_classic")
    a.set_defaults(func=_assess)

    s = sub.add_parser("sample-volume", help="render a saved model at any resolution")
    s.add_argument("--input-model", required=True, metavar="PT")
    s.add_argument("--output-volume", required=True, metavar="NII")
    s.add_argument("--output-resolution", type=float, default=0.8, metavar="MM")
    s.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    s.set_defaults(func=_sample_volume)

    k = sub.add_parser("config", help="print every reconstruction setting with its default, or migrate an old config file")
    k.add_argument("--migrate", metavar="YAML", help="a config in the flat layout of gsvr 0.1: print it in sections")
    k.set_defaults(func=_config)

    m = sub.add_parser("simulate", help="simulate motion-corrupted stacks from a ground-truth volume")
    m.add_argument("--input-volume", required=True, metavar="NII")
    m.add_argument("--input-mask", required=True, metavar="NII")
    m.add_argument("--output-dir", required=True)
    m.add_argument("--n-stacks", type=int, default=3)
    m.add_argument("--inplane-spacing", type=float, default=0.8, metavar="MM")
    m.add_argument("--thickness", type=float, default=3.0, metavar="MM")
    m.add_argument("--slice-spacing", type=float, metavar="MM", help="default: thickness")
    m.add_argument("--obliquity", type=float, default=0.0, metavar="DEG")
    m.add_argument("--stack-rotation", type=float, default=0.0, metavar="DEG")
    m.add_argument("--motion-rotation", type=float, default=6.0, metavar="DEG")
    m.add_argument("--motion-translation", type=float, default=4.0, metavar="MM")
    m.add_argument("--noise", type=float, default=0.02, help="Rician sigma / 99th percentile")
    m.add_argument("--corrupted-fraction", type=float, default=0.0)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=_simulate)

    q = sub.add_parser("preprocess", help="crop stacks to their masks, optional N4 bias correction, standardise intensities")
    q.add_argument("--input-stacks", nargs="+", required=True, metavar="NII")
    q.add_argument("--stack-masks", nargs="+", required=True, metavar="NII")
    q.add_argument("--output-dir", required=True, help="writes <stack name>.nii.gz and <stack name>_mask.nii.gz")
    q.add_argument("--crop-margin", type=float, default=10.0, metavar="MM", help="in-plane margin around the mask")
    q.add_argument("--n4", action="store_true", help="N4 bias-field correction inside the mask (SimpleITK)")
    q.add_argument("--no-standardise", action="store_true", help="keep each stack's intensity scale")
    q.set_defaults(func=_preprocess)

    g = sub.add_parser("segment", help="segment a volume into the FeTA structures (multi-atlas, or a trained nnU-Net)")
    g.add_argument("--input-volume", required=True, metavar="NII")
    g.add_argument("--output-labels", required=True, metavar="NII")
    g.add_argument("--atlas", nargs="+", default=[], metavar="DIR",
                   help="atlas folders, each with srr.nii.gz and parcellation.nii.gz (e.g. data/atlases/GA22)")
    g.add_argument("--registration-spacing", type=float, default=1.6, metavar="MM", help="spacing the atlas registrations run at")
    g.add_argument("--nnunet-model", metavar="DIR", help="use a trained nnU-Net v2 model folder instead of atlases")
    g.add_argument("--threads", type=int, help="ITK threads (default: all cores)")
    g.set_defaults(func=_segment)

    e = sub.add_parser("evaluate", help="compare a reconstruction with the ground truth")
    e.add_argument("--input-volume", required=True, metavar="NII", help="reconstruction")
    e.add_argument("--reference", required=True, metavar="NII", help="ground-truth volume")
    e.add_argument("--reference-mask", required=True, metavar="NII")
    e.add_argument("--output-json", metavar="JSON")
    e.add_argument("--no-registration", action="store_true")
    e.set_defaults(func=_evaluate)
    return p


def _add_input_flags(r: argparse.ArgumentParser) -> None:
    """Stacks and reconstruction settings: shared by reconstruct, svr and assess."""
    r.add_argument("--input-stacks", nargs="+", required=True, metavar="NII")
    r.add_argument("--stack-masks", nargs="+", metavar="NII", help="one brain mask per stack")
    r.add_argument("--thicknesses", nargs="+", type=float, metavar="MM", help="slice thickness per stack (default: slice spacing)")
    r.add_argument("--output-resolution", type=float, metavar="MM", help="isotropic output voxel size (default 0.8)")
    r.add_argument("--config", metavar="YAML", help="reconstruction settings (see config/recon_default.yaml), or the "
                   "provenance sidecar of an earlier run (its volume's .json) to repeat that run's settings")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"))
    r.add_argument("--align", "--registration", dest="align", choices=("stack", "none"),
                   help="rigid stack-to-stack alignment with a multi-start over rotations before SVR (default: stack; "
                        "none keeps the header geometry); the config's align section")
    r.add_argument("--seed", type=int)
    r.add_argument("--no-progress", action="store_true", help="no progress report (default: a bar on a terminal, "
                   "else a log line every 10 s)")


def _add_reconstruction_flags(r: argparse.ArgumentParser) -> None:
    _add_input_flags(r)
    r.add_argument("--output-volume", required=True, metavar="NII",
                   help="the volume; its provenance sidecar (settings, input hashes, versions, time, memory) is written "
                   "beside it, NAME.nii.gz -> NAME.json")
    r.add_argument("--output-slices-tsv", metavar="TSV", help="per-slice motion, intensity scale and weight")
    r.add_argument("--output-log", metavar="TSV", help="per-step log: stage, elapsed time and the stage's fit measure")


def _recon_config(args: argparse.Namespace):
    from gsvr.provenance import read_settings
    from gsvr.recon.config import ReconConfig

    # A YAML file of settings, or a provenance sidecar (its settings member)
    cfg = ReconConfig.from_dict(read_settings(args.config, method=args.method), source=args.config) if args.config \
        else ReconConfig()
    flags = {"output.resolution_mm": args.output_resolution, "run.device": args.device, "run.seed": args.seed}
    changes = {k: v for k, v in flags.items() if v is not None}
    if args.align == "none":
        changes["align"] = None
    elif args.align == "stack" and cfg.align is None:
        changes["align"] = {}
    return cfg.updated(changes, source="command line") if changes else cfg


def _config(args: argparse.Namespace) -> int:
    from gsvr.recon.config_reference import default_yaml, migrate_yaml

    print(migrate_yaml(args.migrate) if args.migrate else default_yaml(), end="")
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    from gsvr.recon.files import reconstruct_files

    reconstruct_files(
        args.input_stacks, args.stack_masks, args.thicknesses, _recon_config(args),
        output_volume=args.output_volume, output_slices_tsv=args.output_slices_tsv, output_model=args.output_model,
        output_log=args.output_log, progress=not args.no_progress, method=args.method,
        checkpoint=args.checkpoint, resume=args.resume, command=args.command_line, source="command line",
    )
    return 0


def _assess(args: argparse.Namespace) -> int:
    from gsvr.evaluate.assess import assess_files

    table = assess_files(args.input_stacks, args.stack_masks, args.thicknesses, _recon_config(args),
                         method=args.method, output_tsv=args.output_tsv, progress=not args.no_progress,
                         full_motion_tsv=args.full_run_slices, other_inputs=[args.config] if args.config else [],
                         full_folds=args.full_folds)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


def _sample_volume(args: argparse.Namespace) -> int:
    from gsvr.io import save_volume
    from gsvr.recon.engine import resolve_device
    from gsvr.recon.volume import load_model, sample_volume

    from gsvr.io.nifti import check_outputs

    check_outputs({"--output-volume": args.output_volume}, inputs=[args.input_model], nifti=["--output-volume"])
    model = load_model(args.input_model)
    vol = sample_volume(model, resolution_mm=args.output_resolution, device=resolve_device(args.device))
    save_volume(args.output_volume, vol.data, vol.affine)
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from gsvr.preprocess.stacks import PreprocessConfig, preprocess_files

    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise GsvrError(f"{out}: --output-dir is a file, not a folder")
    names = [Path(p).name.removesuffix(".gz").removesuffix(".nii") for p in args.input_stacks]
    if len(set(names)) != len(names):
        raise GsvrError("input stacks must have distinct file names (they name the outputs)")
    cfg = PreprocessConfig(crop_margin_mm=args.crop_margin, n4=args.n4, standardise=not args.no_standardise)
    with _output_folder(out):
        preprocess_files(args.input_stacks, args.stack_masks, [out / f"{n}.nii.gz" for n in names],
                         [out / f"{n}_mask.nii.gz" for n in names], cfg)
    return 0


@contextlib.contextmanager
def _output_folder(out: Path):
    """Make the folder ``out`` (and its missing parents); a failure inside the block removes the folders this made
    (those left empty)."""
    created = [d for d in (out, *out.parents) if not d.exists()]  # deepest first
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for d in created:
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def _simulate(args: argparse.Namespace) -> int:
    from gsvr.io.nifti import load_image, overwritten_input, same_grid
    from gsvr.simulate.stacks import SimulationConfig, simulate_stacks, write_simulation

    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise GsvrError(f"{args.output_dir}: --output-dir is a file, not a folder")
    outputs = [out / "motions.tsv", *(out / f"stack{k}{e}.nii.gz" for k in range(max(args.n_stacks, 0)) for e in ("", "_mask"))]
    for path in outputs:
        source = overwritten_input(path, (args.input_volume, args.input_mask))
        if source is not None:
            raise GsvrError(f"{path}: this output would overwrite the input {source}; give another --output-dir")
    vol, aff = load_image(args.input_volume, what="volume")
    mask, mask_aff = load_image(args.input_mask, what="mask")
    if mask.shape != vol.shape:
        raise GsvrError(f"{args.input_mask}: mask shape {mask.shape} differs from volume shape {vol.shape}")
    if not same_grid(mask.shape, mask_aff, vol.shape, aff):
        raise GsvrError(f"{args.input_mask}: mask grid (its header's voxel-to-world affine) differs from the volume's")
    if not (mask > 0).any():
        raise GsvrError(f"{args.input_mask}: mask is empty")
    cfg = SimulationConfig(
        n_stacks=args.n_stacks, inplane_spacing_mm=args.inplane_spacing, thickness_mm=args.thickness,
        slice_spacing_mm=args.slice_spacing, obliquity_deg=args.obliquity, stack_rotation_deg=args.stack_rotation,
        motion_rotation_deg=args.motion_rotation, motion_translation_mm=args.motion_translation,
        noise_level=args.noise, corrupted_fraction=args.corrupted_fraction, seed=args.seed,
    )
    sim = simulate_stacks(vol, mask, aff, cfg)
    with _output_folder(out):
        write_simulation(sim, out)
    return 0


def _segment(args: argparse.Namespace) -> int:
    import os

    if args.threads is not None and args.threads < 1:
        raise GsvrError(f"--threads must be >= 1, got {args.threads}")
    if args.threads:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    from gsvr.evaluate.segmentation import SegmentationSettings, segment_file

    if not args.atlas and not args.nnunet_model:
        raise GsvrError("segment: give --atlas folders or --nnunet-model")
    settings = SegmentationSettings(segmenter="nnunet" if args.nnunet_model else "atlas", atlases=tuple(args.atlas),
                                    registration_spacing_mm=args.registration_spacing, nnunet_model=args.nnunet_model)
    segment_file(args.input_volume, args.output_labels, settings)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from gsvr.evaluate import evaluate_files

    res = evaluate_files(args.input_volume, args.reference, args.reference_mask, output_json=args.output_json,
                         register=not args.no_registration)
    print(json.dumps(res.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
