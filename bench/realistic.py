"""Benchmark: a realistic simulated acquisition (issue 5) and the six-stack memory case.

realistic: the ground truth placed in a synthetic maternal body (a textured ellipsoid filling the
field of view, so the stacks show non-brain tissue around the brain); six stacks 0.8x0.8 mm, 3 mm
slices every 3.3 mm covering the brain, oblique (U(+-10 deg) per axis), each stack turned by
U(+-35 deg) per axis (up to ~60 deg between stacks), slice motion U(+-4 deg)/U(+-3 mm), 10 %
corrupted slices, masks saved with a header shifted by 0.05 mm. memory: the same with six stacks of
320x320x22. Each case is reconstructed by `gsvr reconstruct` in a fresh process (defaults, and with
--align stack), next to the clean 3-stack case (GSVR's severe protocol) for reference.
Prints PSNR/SSIM (the project's protocol), wall time and peak RSS, and the machine.

    python bench/realistic.py [--subjects GA23] [--cases clean realistic memory] [--align none stack]
                              [--config recon.yaml]   (other settings; --align still wins)
                              [--keep DIR [--simulate-only]]   (keep the simulated stacks, e.g. for gsvr assess)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ATLAS = ROOT.parent / "shared" / "data" / "fetal_atlas"
BODY_MM = 260.0  #: extent of the synthetic body volume (cube side)


def with_body(vol: np.ndarray, mask: np.ndarray, affine: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The brain inside a textured ellipsoid 'body' on a BODY_MM cube at the volume's spacing."""
    from scipy import ndimage

    spacing = float(np.linalg.norm(affine[:3, 0]))
    n = int(BODY_MM / spacing)
    rng = np.random.default_rng(seed)
    centre_world = np.argwhere(mask > 0).mean(0) @ affine[:3, :3].T + affine[:3, 3]
    big_aff = np.diag([spacing, spacing, spacing, 1.0])
    big_aff[:3, 3] = centre_world - spacing * (n - 1) / 2
    ijk = np.indices((n, n, n), dtype=np.float32).reshape(3, -1).T
    world = ijk * spacing + big_aff[:3, 3]
    r = (world - centre_world) / np.array([120.0, 100.0, 125.0])
    body = (np.sum(r * r, 1) <= 1.0).reshape(n, n, n)
    peak = float(np.percentile(vol[mask > 0], 99))
    texture = ndimage.gaussian_filter(rng.normal(0, 1, (n // 4,) * 3).astype(np.float32), 2.0)
    texture = ndimage.zoom(texture, n / texture.shape[0], order=1)[:n, :n, :n]
    out = np.where(body, peak * (0.45 + 0.15 * texture / (texture.std() + 1e-6)), 0.0).astype(np.float32)
    # Paste the brain (its own non-zero voxels) at its world position.
    src = np.linalg.inv(affine) @ np.c_[world, np.ones(len(world))].T
    brain = ndimage.map_coordinates(vol, src[:3], order=1, cval=0.0).reshape(n, n, n)
    bmask = ndimage.map_coordinates((mask > 0).astype(np.float32), src[:3], order=0, cval=0.0).reshape(n, n, n) > 0.5
    inside = ndimage.map_coordinates((vol > 0).astype(np.float32), src[:3], order=1, cval=0.0).reshape(n, n, n) > 0.5
    out = np.where(inside, brain, out).astype(np.float32)
    return out, bmask.astype(np.uint8), big_aff


CASES = {
    "clean": dict(n_stacks=3, obliquity_deg=8.0, motion_rotation_deg=6.0, motion_translation_mm=4.0, noise_level=0.02),
    "realistic": dict(n_stacks=6, thickness_mm=3.0, slice_spacing_mm=3.3, obliquity_deg=10.0, stack_rotation_deg=35.0,
                      motion_rotation_deg=4.0, motion_translation_mm=3.0, noise_level=0.02, corrupted_fraction=0.1,
                      inplane_fov_mm=240.0),
    "memory": dict(n_stacks=6, thickness_mm=3.0, slice_spacing_mm=3.3, obliquity_deg=10.0, motion_rotation_deg=4.0,
                   motion_translation_mm=3.0, noise_level=0.02, corrupted_fraction=0.1, inplane_fov_mm=256.0, n_slices=22),
}


def child(args) -> None:
    """Run `gsvr reconstruct` in this process; print wall time and peak RSS as JSON."""
    from gsvr.cli import main as gsvr_main

    stacks = sorted(str(p) for p in Path(args.sim).glob("stack?.nii.gz"))
    masks = [s.replace(".nii.gz", "_mask.nii.gz") for s in stacks]
    thick = [str(args.thickness)] * len(stacks)
    t = time.perf_counter()
    code = gsvr_main(["reconstruct", "--input-stacks", *stacks, "--stack-masks", *masks, "--thicknesses", *thick,
                      "--output-volume", args.out, "--align", args.align, "--no-progress",
                      *(["--config", args.config] if args.config else [])])
    wall = time.perf_counter() - t
    print(json.dumps({"code": code, "wall_s": wall, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", nargs="+", default=["GA23"])
    p.add_argument("--cases", nargs="+", default=list(CASES))
    p.add_argument("--align", "--registration", dest="align", nargs="+", default=["none", "stack"])
    p.add_argument("--atlas", default=str(ATLAS))
    p.add_argument("--config", help="reconstruction config YAML (defaults otherwise)")
    p.add_argument("--keep", metavar="DIR", help="write the simulations here (kept) instead of a temporary folder")
    p.add_argument("--simulate-only", action="store_true", help="write the simulations (with --keep) and stop")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sim", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--thickness", type=float, help=argparse.SUPPRESS)
    p.add_argument("--reg", dest="align_one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.align = args.align_one
        return child(args)

    import nibabel as nib
    import torch

    from gsvr.evaluate import evaluate_volume
    from gsvr.io.nifti import load_image
    from gsvr.simulate.stacks import SimulationConfig, simulate_stacks, write_simulation

    print(f"# machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.cuda.is_available()}")
    print("| subject | case | align | stacks | stack shape | PSNR | SSIM | NCC | wall s | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or scratch
        for subject in args.subjects:
            vol, aff = load_image(Path(args.atlas) / subject / "srr.nii.gz")
            mask, _ = load_image(Path(args.atlas) / subject / "mask.nii.gz")
            for case in args.cases:
                settings = CASES[case]
                if case == "clean":
                    src = (vol, mask, aff)
                else:
                    src = with_body(vol, mask, aff, seed=1)
                sim = simulate_stacks(*src, SimulationConfig(seed=1, through_plane_samples=11, **settings))
                sim_dir = Path(tmp) / subject / case
                write_simulation(sim, sim_dir)
                for mpath in sim_dir.glob("stack?_mask.nii.gz"):  # masks from another tool: header off by 0.05 mm
                    img = nib.load(mpath)
                    a = img.affine.copy()
                    a[:3, 3] += 0.05
                    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), a), mpath)
                if args.simulate_only:
                    print(f"# {subject} {case}: {len(sim.stacks)} stacks in {sim_dir}", flush=True)
                    continue
                regs = ["none"] if case == "memory" else args.align
                for reg in regs:
                    out = sim_dir / f"rec_{reg}.nii.gz"
                    cmd = [sys.executable, __file__, "--child", "--sim", str(sim_dir), "--out", str(out),
                           "--thickness", str(settings.get("thickness_mm", 3.0)), "--reg", reg]
                    if args.config:
                        cmd += ["--config", args.config]
                    run = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
                    if run["code"] != 0:
                        print(f"| {subject} | {case} | {reg} | failed with status {run['code']} |", flush=True)
                        continue
                    rec, rec_aff = load_image(out)
                    ev = evaluate_volume(rec, rec_aff, vol, aff, mask)
                    shape = "x".join(map(str, sim.stacks[0].data.shape))
                    print(f"| {subject} | {case} | {reg} | {len(sim.stacks)} | {shape} | {ev.psnr:.2f} | {ev.ssim:.3f} | "
                          f"{ev.ncc:.3f} | {run['wall_s']:.0f} | {run['peak_rss_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
