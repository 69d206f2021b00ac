"""Benchmark: the Gaussian stage against the voxel volume it starts from, on one severe case.

The severe protocol of ``bench/severe.py`` (seed ``--seed``) on one subject. The stages up to the SVR
cycles run once, with the super-resolution on the output grid (``fit.target: output``); then, for each
render mode of ``--modes``:

- the output-grid voxel volume (``gsvr svr``'s) and the Gaussians fitted to it, scored against the truth;
- the fitted field sampled with K, 2K and 4K neighbours (mean over brain voxels): a field whose value
  depends on K is not the same field for a slice (whose PSF reaches further) as for the output volume;
- the slices' held-out error (10 % of the pixels, :func:`gsvr.recon.svr.holdout_pixels`; with ``--holdout
  slices`` 10 % of the slices, whose pixels the final voxel solve, the fit and the refinement do not see; the SVR
  cycles, which estimated the motions and weights, did) of the voxel
  volume (PSF quadrature) and of the field (its own slice render);
- optionally ``--steps`` steps of the field's refinement on the other 90 % of the pixels (slice motion
  frozen at the SVR cycles', weighted squared error, Adam at ``--lr-scale`` times the fit's rates), with
  the held-out error every ``--every`` steps and the score every ``2 --every``. ``--render quadrature`` trains and
  holds out with the field sampled at the voxel operator's PSF nodes instead of the PSF-blurred Gaussians.

    python bench/gaussian_stage.py [--subject GA25] [--modes exact normalized] [--steps 30] [--config recon.yaml]
                                   [--holdout pixels|slices] [--holdout-fraction 0.1] [--render gaussians|quadrature]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from severe import ATLAS, CASES  # noqa: E402  (the bench folder is not a package)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subject", default="GA25")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--modes", nargs="+", default=["exact", "normalized"], choices=["exact", "normalized"])
    p.add_argument("--k", type=int, default=32, help="neighbours per point (model.k_neighbors)")
    p.add_argument("--steps", type=int, default=0, help="refinement steps on the slices after the fit")
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--lr-scale", type=float, default=1.0)
    p.add_argument("--holdout", choices=["pixels", "slices"], default="pixels",
                   help="what the held-out error holds out: a hashed fraction of the pixels, or of the slices (then the "
                        "voxel volume, the fit's target, is solved again without them)")
    p.add_argument("--holdout-fraction", type=float, default=0.1)
    p.add_argument("--render", choices=["gaussians", "quadrature"], default="gaussians",
                   help="the slice render the refinement trains and is held out with: the PSF-blurred Gaussians (the "
                        "engine's), or the field sampled at the voxel operator's PSF nodes")
    p.add_argument("--config", help="reconstruction config YAML (defaults otherwise); fit.target and K are set here")
    p.add_argument("--atlas", default=str(ATLAS))
    args = p.parse_args()

    import numpy as np
    import torch

    from gsvr.evaluate import evaluate_volume
    from gsvr.io.nifti import load_image
    from gsvr.recon.checkpoint import Checkpointer
    from gsvr.recon.config import ReconConfig
    from gsvr.recon.engine import deterministic
    from gsvr.recon.forward import Neighbours, current_positions, render_slices
    from gsvr.recon.stages import PIPELINE
    from gsvr.recon.stages.fit import fit_to_volume
    from gsvr.recon.stages.init import field_from_volume
    from gsvr.recon.state import ReconState, support_radius
    from gsvr.recon.refine import PsfQuadrature
    from gsvr.recon.svr import SliceOperator, holdout_pixels, output_super_resolution, support_mask
    from gsvr.recon.volume import sample_volume
    from gsvr.io.nifti import load_stacks
    from gsvr.simulate.stacks import SimulationConfig, simulate_stacks, write_simulation

    print(f"# machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}; {args.subject} seed {args.seed}, K = {args.k}; config {args.config or 'defaults'}")
    vol, aff = load_image(Path(args.atlas) / args.subject / "srr.nii.gz")
    mask, _ = load_image(Path(args.atlas) / args.subject / "mask.nii.gz")
    sim = simulate_stacks(vol, mask, aff, SimulationConfig(obliquity_deg=8.0, noise_level=0.02, seed=args.seed,
                                                           **CASES["severe"]))
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_simulation(sim, tmp)
        stacks = load_stacks(paths, [s.replace(".nii.gz", "_mask.nii.gz") for s in paths], [3.0] * len(paths))
    base = (ReconConfig.from_yaml(args.config) if args.config else ReconConfig()).updated({"fit.target": "output", "model.k_neighbors": args.k, "output.k_neighbors": args.k})
    if not (base.svr_cycles_run and base.fits_output_volume):
        sys.exit("bench/gaussian_stage.py: the config must run the SVR cycles and fit the Gaussians to their volume "
                 "(svr, fit and init.from_svr on)")
    # The stages up to the SVR cycles, once.
    t0 = time.perf_counter()
    with deterministic():
        state = ReconState(cfg=base, ck=Checkpointer(None, 0, base.model.knn_every, resume=False,
                                                     stages=[s.NAME for s, _ in PIPELINE]), stacks=stacks, progress=False)
        for stage, section in PIPELINE[:4]:
            state = stage.run(state, getattr(base, section))
    data, motion, svr = state.data, state.motion, state.svr
    weight = state.weights[data.slice_idx] * state.pixel_weights  # the output super-resolution's pixel weights
    for q in motion.parameters():
        q.requires_grad_(False)
    x = current_positions(data, motion)
    radius = support_radius(state.stacks)
    if args.holdout == "slices":  # whole slices: the field and its target never see them
        held = holdout_pixels(data.n_slices, args.holdout_fraction)[data.slice_idx]
        with deterministic():
            svr = output_super_resolution(data, motion, weight * (~held).float(), base.svr, base.output.resolution_mm, radius)
    else:
        held = holdout_pixels(data.n_pixels, args.holdout_fraction)
    train, test = torch.nonzero(~held)[:, 0], torch.nonzero(held)[:, 0]
    w_test, w_train = weight[test], weight[train]
    print(f"# stages up to the SVR cycles: {time.perf_counter() - t0:.0f} s; {data.n_pixels} pixels, "
          f"{int(held.sum())} held out")

    def score(data_np, affine) -> str:
        ev = evaluate_volume(data_np, affine, vol, aff, mask)
        return f"{ev.psnr:.2f} / {ev.ssim:.3f}"

    with torch.no_grad():
        op = SliceOperator(data, motion, svr.grid, base.svr, test)
        pred = torch.exp(motion.log_scale)[op.sid] * op.forward(svr.volume)
        err = float((w_test * (pred - data.y[test]) ** 2).sum() / w_test.sum())
    voxel = (svr.volume.clamp_min(0) * data.intensity_scale).numpy().astype(np.float32)
    print(f"voxel volume (gsvr svr): {score(voxel, svr.grid.affine(data.origin_mm))}; held-out error {err:.3e}")

    for mode in args.modes:
        cfg = base.updated({"model.render_mode": mode})
        m, k, chunk = cfg.model, args.k, cfg.model.chunk_pixels
        gen = torch.Generator().manual_seed(cfg.run.seed)
        t = time.perf_counter()
        with deterministic():
            covered = support_mask(svr.grid, x, radius)
            field = field_from_volume(svr, covered, cfg.init, m, gen, n=cfg.init.n_gaussians, k=k)
            fit_to_volume(field, svr, covered, cfg.fit, m, k=k)
        fit_s = time.perf_counter() - t
        brain = svr.grid.points("cpu")[svr.volume > 0.05]
        brain = brain[torch.randperm(len(brain), generator=torch.Generator().manual_seed(0))[:50_000]]

        def model_dict() -> dict:
            return {"field": field.state(), "origin_mm": data.origin_mm, "intensity_scale": data.intensity_scale,
                    "support_points": x, "support_radius_mm": radius, "config": cfg.to_dict(),
                    "motion": {"rotvec": motion.rotvec, "trans": motion.trans, "log_scale": motion.log_scale,
                               "centre": data.centre}}

        def field_score() -> str:
            v = sample_volume(model_dict(), resolution_mm=cfg.output.resolution_mm)
            return score(v.data, v.affine)

        nbrs = Neighbours(None)

        def held_out() -> float:
            with torch.no_grad():
                r = render_slices(field, motion, data, nbrs, model=m, motion_on=False)
                total = sum(float((w_test[i:i + chunk] * (r.predict(test[i:i + chunk]) - data.y[test[i:i + chunk]]) ** 2).sum())
                            for i in range(0, len(test), chunk))
            return total / float(w_test.sum())

        quad_test = PsfQuadrature(data, motion, base.svr, test, weight)

        def held_out_quadrature() -> float:
            """The held-out error of the field's own PSF integral: the field sampled at the voxel operator's
            Gauss-Hermite nodes around each held-out pixel (K neighbours per node), in place of its slice render."""
            quad_test.refresh(field, k, m.knn_backend)
            return quad_test.error(field, m)

        with torch.no_grad():
            means = [float(field.sample(brain, k=kk, delta=m.delta).mean()) for kk in (k, 2 * k, 4 * k)]
        nbrs.refresh(x, data.slice_idx, field.means, k, m.knn_backend)
        print(f"{mode}: fit {fit_s:.0f} s, {field_score()}; field mean with K, 2K, 4K neighbours "
              f"{means[0]:.4f} {means[1]:.4f} {means[2]:.4f}; held-out error of its slice render {held_out():.3e}, "
              f"of its PSF quadrature {held_out_quadrature():.3e}")
        if not args.steps:
            continue
        groups = field.param_groups(cfg.fit.lr)
        for g in groups:
            g["lr"] *= args.lr_scale
        opt = torch.optim.Adam(groups)
        t = time.perf_counter()
        quadrature = args.render == "quadrature"
        if quadrature:  # the training pixels' PSF nodes, as the voxel operator places them
            quad_train = PsfQuadrature(data, motion, base.svr, train, weight)
        error = held_out_quadrature if quadrature else held_out
        with deterministic():
            for step in range(args.steps + 1):
                if step % m.knn_every == 0:
                    if quadrature:
                        quad_train.refresh(field, k, m.knn_backend)
                    else:
                        nbrs.refresh(x, data.slice_idx, field.means, k, m.knn_backend)
                if step % args.every == 0:
                    shown = field_score() if step % (2 * args.every) == 0 or step == args.steps else ""
                    print(f"  {mode} step {step}: held-out error {error():.3e} {shown} ({time.perf_counter() - t:.0f} s)",
                          flush=True)
                if step == args.steps:
                    break
                opt.zero_grad(set_to_none=True)
                if quadrature:
                    quad_train.error(field, m, backward=True)
                else:
                    r = render_slices(field, motion, data, nbrs, model=m, motion_on=False)
                    for i in range(0, len(train), chunk):
                        sel = train[i:i + chunk]
                        loss = (w_train[i:i + chunk] * (r.predict(sel) - data.y[sel]) ** 2).sum() / w_train.sum()
                        loss.backward()
                    r.backward()
                opt.step()


if __name__ == "__main__":
    main()
