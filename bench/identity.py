"""Behaviour fingerprint: SHA-256 of the output volume and slice table of fixed reconstructions.

A refactoring that claims to preserve behaviour must print the same hashes before and after (CPU,
same torch build). Cases:
- ``severe``: GA23 under the severe protocol of ``bench/severe.py``, default settings (minutes);
- ``tiny-*``: the demo subject at 1.6 mm with motion, one case per group of switches (seconds each).

    python bench/identity.py [--cases tiny severe]

Settings are given in the flat names of gsvr 0.1 (see ``FLAT``), so the same cases run before and
after the nested configuration of 0.2 (through ``gsvr.recon.config_reference.nest_flat``).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ATLAS = ROOT.parent / "shared" / "data" / "fetal_atlas"
DEMO = ROOT / "data" / "demo" / "GA23"

_FAST = dict(n_gaussians=3000, k_neighbors=12, output_resolution_mm=1.6, svr_spacings_mm=[3.2, 3.2, 2.4],
             init_fit_steps=20, knn_every=4, registration="none", seed=0)
#: Flat settings of each tiny case (the old flat key names).
FLAT = {
    "tiny-default": dict(_FAST),
    "tiny-stack": dict(_FAST, registration="stack", svr_stack_spacings_mm=[3.2]),
    "tiny-joint": dict(_FAST, iterations=10, multires_steps=4, knn_every=3, loss="smooth_l1", ssim_weight=0.1,
                       tv_weight=0.01, batch_fraction=0.5, schedule="cosine"),
    "tiny-mgaussian": dict(_FAST, iterations=10, progressive_spacings_mm=[4.8, 3.2], progressive_milestones=[5],
                           nrf=True, nrf_start=4, neighbour_query="block", block_radius=2, aniso_weight=0.01, knn_every=3),
    "tiny-densify": dict(_FAST, iterations=10, densify_every=3, knn_every=3, render_mode="normalized", psf=False),
    "tiny-scratch": dict(_FAST, iterations=8, init_from_svr=False, knn_every=3),
    "tiny-nomotion": dict(_FAST, iterations=8, motion=False, knn_every=3),
    "tiny-em": dict(_FAST, svr_robust="em", svr_prior="edge"),
}


def _config(flat: dict):
    from gsvr.recon.config import ReconConfig

    try:  # gsvr >= 0.2: nested sections
        from gsvr.recon.config_reference import nest_flat
    except ImportError:  # gsvr 0.1: the flat layout itself
        return ReconConfig.from_dict(flat)
    return ReconConfig.from_dict(nest_flat(flat))


def _digest(result) -> tuple[str, str]:
    vol = hashlib.sha256(np.ascontiguousarray(result.volume.data, dtype=np.float32).tobytes()
                         + np.ascontiguousarray(result.volume.affine).tobytes()).hexdigest()[:16]
    table = hashlib.sha256(result.slices.to_csv(sep="\t", index=False, float_format="%.9g").encode()).hexdigest()[:16]
    return vol, table


def _tiny_stacks():
    import nibabel as nib
    from scipy import ndimage

    from gsvr.io.nifti import Stack
    from gsvr.simulate.stacks import SimulationConfig, simulate_stacks

    img = nib.load(DEMO / "srr.nii.gz")
    mask = nib.load(DEMO / "mask.nii.gz").get_fdata() > 0
    vol = ndimage.zoom(img.get_fdata().astype(np.float32), 0.5, order=1).astype(np.float32)
    m = ndimage.zoom(mask.astype(np.float32), 0.5, order=1) > 0.5
    affine = img.affine.copy()
    affine[:3, :3] *= 2.0
    sim = simulate_stacks(vol, m, affine, SimulationConfig(inplane_spacing_mm=1.6, thickness_mm=4.0, noise_level=0.01,
                                                           fov_margin_mm=4.0, through_plane_samples=11, obliquity_deg=5.0,
                                                           motion_rotation_deg=4.0, motion_translation_mm=3.0, seed=4))
    return [Stack(data=s.data, mask=s.mask > 0, affine=s.affine, thickness_mm=s.thickness_mm, name=f"s{k}")
            for k, s in enumerate(sim.stacks)]


def _severe_stacks():
    from gsvr.io.nifti import Stack, load_image
    from gsvr.simulate.stacks import SimulationConfig, simulate_stacks

    vol, aff = load_image(ATLAS / "GA23" / "srr.nii.gz")
    mask, _ = load_image(ATLAS / "GA23" / "mask.nii.gz")
    sim = simulate_stacks(vol, mask, aff, SimulationConfig(obliquity_deg=8.0, noise_level=0.02, seed=1,
                                                           motion_rotation_deg=6.0, motion_translation_mm=4.0))
    return [Stack(data=s.data, mask=s.mask > 0, affine=s.affine, thickness_mm=s.thickness_mm, name=f"stack{k}")
            for k, s in enumerate(sim.stacks)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["tiny"], help="tiny (every tiny-* case), tiny-<name>, severe")
    args = p.parse_args()
    from gsvr.recon.engine import reconstruct

    wanted = [c for c in FLAT if "tiny" in args.cases or c in args.cases]
    print("| case | volume sha256 | slices sha256 | s |")
    print("|---|---|---|---|")
    if wanted:
        tiny = _tiny_stacks()
    for case in wanted:
        t = time.perf_counter()
        result = reconstruct(tiny, _config(FLAT[case]), progress=False)
        print(f"| {case} | {' | '.join(_digest(result))} | {time.perf_counter() - t:.0f} |", flush=True)
    if "severe" in args.cases:
        t = time.perf_counter()
        result = reconstruct(_severe_stacks(), _config({}), progress=False)
        print(f"| severe GA23 (defaults) | {' | '.join(_digest(result))} | {time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
