"""Benchmark: GSVR's severe protocol and a no-motion case on the shared fetal atlas.

For each subject: simulate 3 orthogonal stacks 0.8x0.8x3 mm, obliquity up to 8 deg, per-slice
motion U(+-6 deg)/U(+-4 mm), 2 % Rician noise (and the same without motion); reconstruct at
0.8 mm with each method (the Gaussian engine in each render mode; the classical voxel SVR) in a
fresh process; evaluate with the project's protocol.
Prints one row per run: PSNR, SSIM, NCC, NRMSE, wall time, peak RSS, and the machine.

    python bench/severe.py [--subjects GA21 GA22 ...] [--modes exact normalized svr_classic] [--config recon.yaml]
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

ROOT = Path(__file__).resolve().parents[1]
ATLAS = ROOT.parent / "shared" / "data" / "fetal_atlas"
CASES = {"severe": dict(motion_rotation_deg=6.0, motion_translation_mm=4.0), "nomotion": dict(motion_rotation_deg=0.0, motion_translation_mm=0.0)}


def child(args) -> None:
    """Reconstruct one case in this process and print wall time and peak RSS as JSON."""
    from gsvr.recon.config import ReconConfig
    from gsvr.recon.files import reconstruct_files

    cfg = ReconConfig.from_yaml(args.config) if args.config else ReconConfig()
    method = "svr_classic" if args.mode == "svr_classic" else "gsvr"
    if method == "gsvr":
        cfg = cfg.updated({"model.render_mode": args.mode})
    stacks = sorted(str(p) for p in Path(args.sim).glob("stack?.nii.gz"))
    masks = [s.replace(".nii.gz", "_mask.nii.gz") for s in stacks]
    t = time.perf_counter()
    reconstruct_files(stacks, masks, None, cfg, output_volume=args.out, progress=False, method=method)
    wall = time.perf_counter() - t
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(json.dumps({"wall_s": wall, "peak_rss_gb": rss_gb}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", nargs="+", default=[f"GA{g}" for g in range(21, 26)])
    p.add_argument("--modes", nargs="+", default=["exact", "normalized", "svr_classic"],
                   help="render modes of the Gaussian engine, and/or svr_classic")
    p.add_argument("--cases", nargs="+", default=list(CASES))
    p.add_argument("--config", help="reconstruction config YAML (defaults otherwise)")
    p.add_argument("--atlas", default=str(ATLAS))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sim", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    import numpy as np

    from gsvr.evaluate import evaluate_volume
    from gsvr.io.nifti import load_image
    from gsvr.simulate.stacks import SimulationConfig, simulate_stacks, write_simulation

    print(f"# machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    import torch

    print(f"# torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, config: {args.config or 'defaults'}")
    print("| subject | case | mode | PSNR | SSIM | NCC | NRMSE | wall s | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for subject in args.subjects:
            vol, aff = load_image(Path(args.atlas) / subject / "srr.nii.gz")
            mask, _ = load_image(Path(args.atlas) / subject / "mask.nii.gz")
            for case in args.cases:
                sim_dir = Path(tmp) / subject / case
                sim = simulate_stacks(vol, mask, aff, SimulationConfig(obliquity_deg=8.0, noise_level=0.02, seed=1, **CASES[case]))
                write_simulation(sim, sim_dir)
                for mode in args.modes:
                    out = sim_dir / f"rec_{mode}.nii.gz"
                    cmd = [sys.executable, __file__, "--child", "--sim", str(sim_dir), "--mode", mode, "--out", str(out)]
                    if args.config:
                        cmd += ["--config", args.config]
                    run = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
                    rec, rec_aff = load_image(out)
                    ev = evaluate_volume(rec, rec_aff, vol, aff, mask)
                    rows.append((case, mode, ev.psnr, ev.ssim, run["wall_s"]))
                    print(f"| {subject} | {case} | {mode} | {ev.psnr:.2f} | {ev.ssim:.3f} | {ev.ncc:.3f} | {ev.nrmse:.3f} | {run['wall_s']:.0f} | {run['peak_rss_gb']:.2f} |", flush=True)
    for case in args.cases:
        for mode in args.modes:
            sel = [r for r in rows if r[0] == case and r[1] == mode]
            if sel:
                arr = np.array([r[2:] for r in sel])
                print(f"# mean {case} {mode}: PSNR {arr[:, 0].mean():.2f}, SSIM {arr[:, 1].mean():.3f}, wall {arr[:, 2].mean():.0f} s over {len(sel)} subjects")


if __name__ == "__main__":
    main()
