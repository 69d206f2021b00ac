"""Benchmark: the left-out NCC of `gsvr assess` that the ground truth itself scores.

For a simulation kept by ``bench/realistic.py --keep DIR --simulate-only``, each stack's pixels are simulated
from the *true* volume through the slice PSF of the assessment (:func:`gsvr.evaluate.assess.simulate_stack`)
and compared with the acquired pixels:

- ``stack``: the true volume placed by the stack's true pose (the rigid fit of its slices' true motions), one
  linear intensity fit: the counterpart of the assessment's ``ncc`` (the stack's own slice motion stays in it; the
  pose fits every slice, the corrupted ones included, where the assessment leaves out those its run weighted
  below 0.5);
- ``slices``: each slice placed by its own true motion and given its own linear intensity fit: the counterpart
  of ``ncc_slices``.

    python bench/realistic.py --subjects GA23 --cases realistic --keep /tmp/real --simulate-only
    python bench/assess_ceiling.py /tmp/real/GA23/realistic --subject GA23 --case realistic
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realistic import ATLAS, CASES, with_body  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sim", help="folder of stack<k>.nii.gz, stack<k>_mask.nii.gz and motions.tsv")
    p.add_argument("--subject", default="GA23")
    p.add_argument("--case", default="realistic", choices=sorted(CASES))
    p.add_argument("--thickness", type=float, help="slice thickness in mm (default: the case's)")
    p.add_argument("--atlas", default=str(ATLAS))
    args = p.parse_args()

    from gsvr.evaluate.assess import compare_pixels, per_slice_intensity_fit, simulate_stack, slice_maps, stack_pose
    from gsvr.io import load_stacks
    from gsvr.io.nifti import load_image

    vol, aff = load_image(Path(args.atlas) / args.subject / "srr.nii.gz")
    mask, _ = load_image(Path(args.atlas) / args.subject / "mask.nii.gz")
    truth, _, truth_aff = (vol, mask, aff) if args.case == "clean" else with_body(vol, mask, aff, seed=1)
    sim = Path(args.sim)
    paths = sorted(str(s) for s in sim.glob("stack?.nii.gz"))
    thickness = args.thickness or CASES[args.case].get("thickness_mm", 3.0)
    stacks = load_stacks(paths, [s.replace(".nii.gz", "_mask.nii.gz") for s in paths], [thickness] * len(paths))
    motions = pd.read_csv(sim / "motions.tsv", sep="\t")
    print("| stack | ncc (true volume, true stack pose) | ncc_slices (true volume, true slice motions) |")
    print("|---|---|---|")
    rows = []
    for i, stack in enumerate(stacks):
        acquired = stack.data[stack.mask].astype(np.float64)
        whole, _ = compare_pixels(simulate_stack(truth, truth_aff, stack, np.linalg.inv(stack_pose(motions, stack, i))), acquired)
        ijk = np.argwhere(stack.mask)
        per_slice = np.zeros(len(ijk))
        for z, pose in slice_maps(motions[motions["stack_index"] == i]).items():
            one = np.zeros_like(stack.mask)
            one[:, :, z] = stack.mask[:, :, z]
            per_slice[ijk[:, 2] == z] = simulate_stack(truth, truth_aff, dataclasses.replace(stack, mask=one), np.linalg.inv(pose))
        fitted = per_slice_intensity_fit(torch.as_tensor(per_slice), torch.as_tensor(acquired), torch.as_tensor(ijk[:, 2]),
                                         stack.data.shape[2])
        slices, _ = compare_pixels(fitted.numpy(), acquired)
        rows.append((whole, slices))
        print(f"| {stack.name} | {whole:.3f} | {slices:.3f} |", flush=True)
    mean = np.mean(rows, axis=0)
    print(f"| **mean** | {mean[0]:.3f} | {mean[1]:.3f} |")


if __name__ == "__main__":
    main()
