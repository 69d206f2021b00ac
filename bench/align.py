"""Benchmark: the stack alignment against the true head turns between stacks.

For each subject and seed: the realistic acquisition of ``bench/realistic.py`` (six stacks in a synthetic
body, each turned by U(+-35 deg) per axis, slice motion U(+-4 deg)/U(+-3 mm), 10 % corrupted slices), with
that seed for the body texture and the simulation. The stacks are prepared as ``gsvr reconstruct`` prepares
them and aligned by :func:`gsvr.preprocess.align.align_stacks` with the config's ``align`` settings. For every
stack but the reference: the true turn relative to the reference (the mean of each stack's true slice
rotations), the rotation the alignment found, and the angle between the two (the alignment's rotation
error). The SVR cycles after the alignment correct a few degrees; a stack left tens of degrees off stays
misregistered.

    python bench/align.py [--subjects GA23 GA21 ...] [--seeds 1 2 3] [--cases GA23:1 GA21:3 ...] [--case clean] [--config recon.yaml]
                          [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realistic import ATLAS, CASES, with_body  # noqa: E402  (the bench folder is not a package)


def simulate(subject: str, seed: int, atlas: Path, out: Path, case: str = "realistic") -> None:
    """The ``case`` of ``bench/realistic.py`` for ``subject`` with ``seed``, written to ``out`` (masks with a 0.05 mm header shift, as
    ``bench/realistic.py`` writes them)."""
    import nibabel as nib

    from gsvr.io.nifti import load_image
    from gsvr.simulate.stacks import SimulationConfig, simulate_stacks, write_simulation

    vol, aff = load_image(atlas / subject / "srr.nii.gz")
    mask, _ = load_image(atlas / subject / "mask.nii.gz")
    sim = simulate_stacks(*with_body(vol, mask, aff, seed=seed),
                          SimulationConfig(seed=seed, through_plane_samples=11, **CASES[case]))
    write_simulation(sim, out)
    for mpath in out.glob("stack?_mask.nii.gz"):
        img = nib.load(mpath)
        a = img.affine.copy()
        a[:3, 3] += 0.05
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), a), mpath)


def stack_turns(motions, n_stacks: int) -> list[np.ndarray]:
    """Each stack's true turn [3, 3]: the mean rotation of its slices' true motions."""
    from scipy.spatial.transform import Rotation

    return [Rotation.from_rotvec(np.radians(motions.loc[motions.stack_index == k, ["rx_deg", "ry_deg", "rz_deg"]].to_numpy()))
            .mean().as_matrix() for k in range(n_stacks)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", nargs="+", default=["GA23", "GA21", "GA25op", "GA26op"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--cases", nargs="+", metavar="SUBJECT:SEED", help="these pairs instead of every subject with every seed")
    p.add_argument("--case", default="realistic", choices=sorted(CASES),
                   help="acquisition of bench/realistic.py (clean: three stacks without head turns, the severe motion)")
    p.add_argument("--config", help="reconstruction config YAML (its preprocess and align sections are used)")
    p.add_argument("--atlas", default=str(ATLAS))
    p.add_argument("--keep", metavar="DIR", help="keep the simulations here (a case already there is reused)")
    args = p.parse_args()

    import pandas as pd
    import torch
    from scipy.spatial.transform import Rotation

    from gsvr.io.nifti import load_stacks
    from gsvr.preprocess.align import align_stacks
    from gsvr.recon.config import AlignConfig, ReconConfig
    from gsvr.recon.stages import prepare

    cfg = ReconConfig.from_yaml(args.config) if args.config else ReconConfig()
    align_cfg = cfg.align or AlignConfig()
    print(f"# machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, torch {torch.__version__}")
    print(f"# align: max_angle_deg {align_cfg.max_angle_deg}; rotation errors per stack, reference excluded")
    print("| subject | seed | reference | true turns deg | found deg | errors deg | stacks within 15 deg | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    total, good = 0, 0
    with tempfile.TemporaryDirectory() as scratch:
        cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases] if args.cases else \
            [(subject, seed) for subject in args.subjects for seed in args.seeds]
        for subject, seed in cases:
            sim = Path(args.keep or scratch) / (f"{subject}_seed{seed}" + ("" if args.case == "realistic" else f"_{args.case}"))
            if not (sim / "motions.tsv").exists():
                simulate(subject, seed, Path(args.atlas), sim, args.case)
            paths = sorted(str(q) for q in sim.glob("stack?.nii.gz"))
            stacks = load_stacks(paths, [q.replace(".nii.gz", "_mask.nii.gz") for q in paths], [3.0] * len(paths))
            stacks = prepare.prepare(stacks, cfg.preprocess)
            turns = stack_turns(pd.read_csv(sim / "motions.tsv", sep="\t"), len(stacks))
            t = time.perf_counter()
            aligned, ref = align_stacks(stacks, max_angle_deg=align_cfg.max_angle_deg, seed=cfg.run.seed,
                                        mask_dilation_mm=cfg.preprocess.mask_dilation_mm)
            wall = time.perf_counter() - t
            true_deg, found_deg, err_deg = [], [], []
            for i, s in enumerate(aligned):
                if i == ref:
                    continue
                truth = turns[ref].T @ turns[i]  # moving anatomy -> reference anatomy
                found = s.alignment[:3, :3]
                true_deg.append(np.degrees(Rotation.from_matrix(truth).magnitude()))
                found_deg.append(np.degrees(Rotation.from_matrix(found).magnitude()))
                err_deg.append(np.degrees(Rotation.from_matrix(found.T @ truth).magnitude()))
            ok = sum(e <= 15 for e in err_deg)
            total, good = total + len(err_deg), good + ok

            def fmt(v: list[float]) -> str:
                return " ".join(f"{x:.0f}" for x in v)

            print(f"| {subject} | {seed} | stack{ref} | {fmt(true_deg)} | {fmt(found_deg)} | {fmt(err_deg)} | "
                  f"{ok}/{len(err_deg)} | {wall:.0f} |", flush=True)
    print(f"# stacks aligned within 15 deg of the truth: {good}/{total}")


if __name__ == "__main__":
    main()
