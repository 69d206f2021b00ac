"""Workflow figures: tri-planar panel and convergence curves are written as PNGs."""

import nibabel as nib
import numpy as np
import pandas as pd

from gsvr.evaluate.figures import convergence_figure, triplanar_panel


def _png_pixels(path):
    import matplotlib.image as mpimg

    return mpimg.imread(path)


def test_triplanar_panel_shows_each_volume_on_the_reference_grid(tmp_path):
    x, y, z = np.meshgrid(*(np.arange(24) - 12.0,) * 3, indexing="ij")
    vol = np.exp(-(x**2 + y**2 + z**2) / 40).astype(np.float32)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "gt.nii.gz")
    nib.save(nib.Nifti1Image((vol > 0.3).astype(np.uint8), affine), tmp_path / "mask.nii.gz")
    coarse = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(vol[::2, ::2, ::2], coarse), tmp_path / "rec.nii.gz")
    out = tmp_path / "panel.png"
    triplanar_panel([("gt", tmp_path / "gt.nii.gz"), ("rec", tmp_path / "rec.nii.gz")], tmp_path / "gt.nii.gz",
                    tmp_path / "mask.nii.gz", out, title="s")
    img = _png_pixels(out)
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.05  # not blank
    assert not list(tmp_path.glob(".panel.png.*"))  # no temporary left behind


def test_convergence_figure_plots_every_logged_measure(tmp_path):
    log = pd.DataFrame({"step": [1, 2, 3], "stage": ["svr", "fit", "fit"], "elapsed_s": [1.0, 2.0, 3.0],
                        "value": [0.8, 0.05, 0.03], "measure": ["ncc", "l1", "l1"]})
    log.to_csv(tmp_path / "a.tsv", sep="\t", index=False)
    pd.DataFrame(columns=log.columns).to_csv(tmp_path / "b.tsv", sep="\t", index=False)
    out = tmp_path / "conv.png"
    convergence_figure({"a": tmp_path / "a.tsv", "b": tmp_path / "b.tsv"}, out)
    img = _png_pixels(out)
    assert img.shape[1] > 1.5 * img.shape[0]  # two panels side by side
