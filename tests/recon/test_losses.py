"""Switchable losses and regularisers of the joint optimisation (issue 6): pixel terms, whole-slice
D-SSIM and TV, the anisotropy penalty and the neural residual field."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from gsvr.errors import GsvrError
from gsvr.io.nifti import Stack
from gsvr.model.residual import ResidualField
from gsvr.recon.config import ReconConfig
from gsvr.recon.losses import anisotropy_penalty, motion_penalty, scale_penalty
from gsvr.recon.losses import SliceImages, pixel_loss, slice_image_terms
from gsvr.recon.slices import SliceMotion, build_slice_data


@pytest.fixture(scope="module")
def slices():
    """Two stacks of smooth images with disc masks of different sizes."""
    rng = np.random.default_rng(0)
    stacks = []
    for k, (n, r) in enumerate([(32, 12), (24, 9)]):
        ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        disc = (ii - n / 2) ** 2 + (jj - n / 2) ** 2 < r * r
        img = 1.0 + 0.5 * np.sin(ii / 3.0)[:, :, None] * np.cos(jj / 4.0)[:, :, None] + 0.01 * rng.normal(size=(n, n, 3))
        stacks.append(Stack(data=img.astype(np.float32), mask=np.repeat(disc[:, :, None], 3, 2), affine=np.eye(4),
                            thickness_mm=1.0, name=f"s{k}"))
    return build_slice_data(stacks, quantile=0.99, device=torch.device("cpu"))


def test_slice_images_put_every_pixel_back_where_it_was(slices):
    images = SliceImages(slices)
    values = torch.arange(slices.n_pixels, dtype=torch.float32) + 1
    img = images.images(values)
    assert img.shape[:2] == (slices.n_slices, 1)
    assert int(images.inside.sum()) == slices.n_pixels
    torch.testing.assert_close(img.flatten()[images.flat], values)
    assert (img[~images.inside] == 0).all()


def test_the_whole_slice_gradient_is_the_gradient_of_the_whole_slice_loss(slices):
    """The engine back-propagates <g, pred> chunk by chunk: that must equal the gradient of the
    D-SSIM + TV of whole slices with respect to whatever produced the predictions."""
    images = SliceImages(slices)
    y = slices.y
    gain = torch.tensor(0.8, requires_grad=True)
    noise = 0.05 * torch.randn(slices.n_pixels, generator=torch.Generator().manual_seed(1))
    pred = gain * (y + noise)
    w = torch.ones(slices.n_slices)
    value, g = slice_image_terms(images, pred.detach(), y, None, w, ssim_weight=0.7, tv_weight=0.3)
    (g * pred).sum().backward()
    surrogate = gain.grad.clone()
    # The same loss written out directly on the images, differentiated by autograd.
    gain.grad = None
    pi, yi, inside = images.images(gain * (y + noise)), images.images(y), images.inside.float()
    _, full = structural_similarity_index_measure(pi, yi, data_range=1.0, return_full_image=True, reduction="none")
    d_ssim = (1 - (full * inside).sum((1, 2, 3)) / inside.sum((1, 2, 3))).mean()
    bh, bw = inside[:, :, 1:] * inside[:, :, :-1], inside[..., 1:] * inside[..., :-1]
    tv = (((pi[:, :, 1:] - pi[:, :, :-1]).abs() * bh).sum((1, 2, 3)) + ((pi[..., 1:] - pi[..., :-1]).abs() * bw).sum((1, 2, 3))) \
        / (bh.sum((1, 2, 3)) + bw.sum((1, 2, 3)))
    direct = 0.7 * d_ssim + 0.3 * tv.mean()
    direct.backward()
    assert value == pytest.approx(float(direct.detach()), rel=1e-5)
    torch.testing.assert_close(surrogate, gain.grad, rtol=1e-4, atol=1e-6)


def test_d_ssim_grows_with_noise_and_tv_ignores_the_mask_edge(slices):
    images, y, w = SliceImages(slices), slices.y, torch.ones(slices.n_slices)
    gen = torch.Generator().manual_seed(2)
    small, _ = slice_image_terms(images, y + 0.02 * torch.randn(len(y), generator=gen), y, None, w, ssim_weight=1.0, tv_weight=0.0)
    large, _ = slice_image_terms(images, y + 0.2 * torch.randn(len(y), generator=gen), y, None, w, ssim_weight=1.0, tv_weight=0.0)
    same, _ = slice_image_terms(images, y, y, None, w, ssim_weight=1.0, tv_weight=0.0)
    assert same == pytest.approx(0.0, abs=1e-5) and 0 < small < large
    # A constant inside each mask (zeros outside): no variation between in-mask neighbours.
    flat, _ = slice_image_terms(images, torch.ones_like(y), y, None, w, ssim_weight=0.0, tv_weight=1.0)
    assert flat == pytest.approx(0.0, abs=1e-7)


def test_a_batch_of_slices_scores_only_those_slices(slices):
    images, y, w = SliceImages(slices), slices.y, torch.ones(slices.n_slices)
    pixels = torch.nonzero(slices.slice_idx == 2)[:, 0]
    noisy = y + 0.1 * torch.randn(len(y), generator=torch.Generator().manual_seed(3))
    part, g = slice_image_terms(images, noisy[pixels], y[pixels], pixels, w, ssim_weight=1.0, tv_weight=0.0)
    one_slice = SliceImages(slices).images(noisy)[2:3], SliceImages(slices).images(y)[2:3]
    _, full = structural_similarity_index_measure(*one_slice, data_range=1.0, return_full_image=True, reduction="none")
    inside = images.inside[2:3].float()
    assert part == pytest.approx(1 - float((full * inside).sum() / inside.sum()), rel=1e-5)
    assert g.shape == pixels.shape


def test_smooth_l1_is_quadratic_near_zero_and_linear_beyond_beta():
    r = torch.tensor([0.01, -0.02, 0.5, -1.0])
    got = pixel_loss(r, torch.zeros(4), "smooth_l1", beta=0.05)
    torch.testing.assert_close(got, torch.tensor([0.5 * 0.01**2 / 0.05, 0.5 * 0.02**2 / 0.05, 0.5 - 0.025, 1.0 - 0.025]))
    torch.testing.assert_close(pixel_loss(r, torch.zeros(4), "l1", beta=0.05), r.abs())
    with pytest.raises(GsvrError, match="loss"):
        ReconConfig.from_dict({"joint": {"loss": {"pixel": "l2"}}})


def test_the_anisotropy_penalty_only_bites_above_the_ratio_and_pulls_the_scales_together():
    iso = torch.log(torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 2.9]]))
    assert float(anisotropy_penalty(iso, 3.0)) == 0.0
    needle = torch.log(torch.tensor([[0.2, 1.0, 2.0]])).requires_grad_(True)
    pen = anisotropy_penalty(needle, 3.0)
    assert float(pen.detach()) == pytest.approx(10.0 - 3.0, rel=1e-5)
    pen.backward()
    assert needle.grad[0, 0] < 0 and needle.grad[0, 2] > 0 and needle.grad[0, 1] == 0  # smallest grows, largest shrinks


def test_the_residual_field_starts_at_zero_stays_bounded_and_bakes_into_the_intensities():
    torch.manual_seed(0)
    nrf = ResidualField(bound=0.1, extent_mm=50.0)
    pts = torch.randn(500, 3) * 40
    assert (nrf(pts) == 0).all()  # switching it on does not disturb the reconstruction
    with torch.no_grad():  # a field far from its initialisation still stays within the bound
        for p in nrf.parameters():
            p.normal_(0, 1.0)
    out = nrf(pts)
    assert out.abs().max() <= 0.1 and out.abs().max() > 0.05
    values = torch.ones(500)
    nrf.bake(pts, values)
    torch.testing.assert_close(values, 1 + out.detach())
    assert nrf.encode(pts).shape == (500, 3 + 6 * 6)


def test_a_reconstruction_with_every_loss_switch_on_samples_at_any_resolution(small_subject, tiny_stacks):
    from gsvr.evaluate import evaluate_volume
    from gsvr.recon.engine import reconstruct
    from gsvr.recon.volume import sample_volume

    vol, mask, affine = small_subject
    stacks = tiny_stacks
    cfg = ReconConfig.from_dict({
        "init": {"n_gaussians": 3000}, "model": {"k_neighbors": 12}, "output": {"resolution_mm": 1.6},
        "svr": {"spacings_mm": [3.2, 2.4]}, "fit": {"steps": 10},
        "joint": {"steps": 6, "batch_fraction": 0.5, "multires": {"steps": 3}, "block_query": {},
                  "loss": {"pixel": "smooth_l1", "ssim_weight": 0.2, "tv_weight": 0.01, "anisotropy": {"weight": 0.01}},
                  "residual_field": {"start": 3, "lr": 1e-3}}})
    res = reconstruct(stacks, cfg, progress=False)
    ev = evaluate_volume(res.volume.data, res.volume.affine, vol, affine, mask)
    assert np.isfinite(res.history["value"]).all() and ev.psnr > 18, ev
    fine = sample_volume(res.model, resolution_mm=0.8)  # the residual field was baked into the Gaussians
    assert np.isfinite(fine.data).all() and fine.data.shape[0] > 1.8 * res.volume.data.shape[0]


def test_the_coarse_level_keeps_the_world_geometry_and_carries_motions_back_exactly(slices):
    """GaussianSVR's multi-resolution: a 2x2-block stack covers the same world region, and a motion
    re-expressed about the coarse slice centres and back is the same rigid map of every pixel."""
    from gsvr.recon.slices import SliceMotion, downsample_inplane, motion_about_centres, transform_points

    rng = np.random.default_rng(1)
    affine = np.array([[0.0, 0.8, 0.1, -30], [0.8, 0.0, 0.0, 10], [0.0, -0.1, 3.0, 5], [0, 0, 0, 1]])
    stack = Stack(data=rng.random((40, 36, 5)).astype(np.float32), mask=np.ones((40, 36, 5), bool), affine=affine,
                  thickness_mm=3.0, name="s")
    coarse = downsample_inplane(stack)
    assert coarse.data.shape == (20, 18, 5) and coarse.thickness_mm == 3.0
    # The centre of coarse voxel (i, j) is the mean of the four fine voxels' centres.
    fine_centres = np.mean([affine @ [2 * 3 + a, 2 * 4 + b, 2, 1] for a in (0, 1) for b in (0, 1)], 0)
    np.testing.assert_allclose(coarse.affine @ [3, 4, 2, 1], fine_centres, atol=1e-9)
    assert coarse.data[3, 4, 2] == pytest.approx(stack.data[6:8, 8:10, 2].mean(), rel=1e-6)
    # Motions about other centres: the same map.
    m = slices.n_slices
    motion = SliceMotion(m, torch.device("cpu"))
    with torch.no_grad():
        motion.rotvec.normal_(0, 0.1)
        motion.trans.normal_(0, 2.0)
    other = slices.centre + torch.randn(m, 3)
    rows = torch.arange(m)
    moved = SliceMotion(m, torch.device("cpu"))
    with torch.no_grad():
        for p, v in zip((moved.rotvec, moved.trans, moved.log_scale), motion_about_centres(motion, slices.centre, other, rows)):
            p.copy_(v)
    a = transform_points(slices.x0, slices.slice_idx, slices.centre, motion.rotation(), motion.trans)
    b = transform_points(slices.x0, slices.slice_idx, other, moved.rotation(), moved.trans)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_the_block_query_renders_like_top_k_when_both_see_every_gaussian(slices):
    """The padding of the block query (a far, zero-weight pair row) adds nothing."""
    from gsvr.model.field import GaussianField
    from gsvr.ops.gaussians import gaussian_sum_packed, pair_tables
    from gsvr.recon.config import BlockQueryConfig
    from gsvr.recon.forward import Neighbours

    g = torch.Generator().manual_seed(0)
    n = 60
    field = GaussianField(slices.x0[torch.randint(0, slices.n_pixels, (n,), generator=g)], torch.full((n, 3), 0.7),
                          torch.randn(n, 4, generator=g), torch.rand(n, generator=g), mode="exact")
    out = {}
    for mode in ("exact", "normalized"):
        for query in ("topk", "block"):
            nbrs = Neighbours(BlockQueryConfig(size_mm=10.0, radius=8) if query == "block" else None)
            nbrs.refresh(slices.x0, slices.slice_idx, field.means, n, "torch")
            tables = pair_tables(field.means, field.log_scales, field.quats, field.values, None, nbrs.pair_slice,
                                 nbrs.pair_gauss, mode=mode)
            out[mode, query] = gaussian_sum_packed(slices.x0, nbrs.nbr_pair, nbrs.pack(tables), mode=mode)
        torch.testing.assert_close(out[mode, "block"], out[mode, "topk"], rtol=1e-5, atol=1e-6)


def test_gsvrs_motion_and_one_sided_scale_regularisers_have_their_closed_form():
    loss = ReconConfig.from_dict({"joint": {"loss": {"scale_reg": "lower", "scale_target_mm": 1.0,
                                                     "motion_rotation_weight": 0.01, "motion_translation_weight": 2e-4}}}).joint.loss
    motion = SliceMotion(2, "cpu")
    with torch.no_grad():
        motion.rotvec[0] = torch.tensor([0.0, 0.3, 0.0])  # 0.3 rad about y: q = (cos 0.15, 0, sin 0.15, 0)
        motion.trans[1] = torch.tensor([3.0, 0.0, -1.0])
    expected = 0.01 * math.sin(0.15) ** 2 / 6 + 2e-4 * 10.0 / 6  # means over 2 slices x 3 axes
    assert motion_penalty(motion, loss).item() == pytest.approx(expected, rel=1e-5)
    log_scales = torch.log(torch.tensor([[2.0, 1.0, 0.5], [1.5, 1.5, 1.5]]))  # only the 0.5 mm axis is below 1 mm
    assert scale_penalty(log_scales, loss).item() == pytest.approx(math.log(2.0) ** 2 / 6, rel=1e-5)
    motion.rotvec.grad = None
    motion_penalty(motion, loss).backward()  # finite at the identity (slice 1)
    assert torch.isfinite(motion.rotvec.grad).all() and motion.rotvec.grad[1].abs().max() == 0
    with pytest.raises(GsvrError, match="scale_reg"):
        ReconConfig.from_dict({"joint": {"loss": {"scale_reg": "upper"}}})
    with pytest.raises(GsvrError, match="model.intensity: linear"):
        ReconConfig.from_dict({"model": {"intensity": "softplus"}, "joint": {"residual_field": {}}})


def test_the_gsvr_paper_preset_reconstructs_from_the_headers(small_subject, tiny_stacks):
    """config/presets/gsvr_paper.yaml at a test's size: one joint optimisation from the headers, softplus
    intensities, no slice scaling or weighting; the motions move."""
    from gsvr.recon.engine import reconstruct

    root = Path(__file__).resolve().parents[2]
    cfg = ReconConfig.from_yaml(root / "config" / "presets" / "gsvr_paper.yaml").updated(
        {"init.n_gaussians": 2000, "joint.steps": 8, "output.resolution_mm": 1.6})
    assert cfg.svr is None and cfg.align is None and cfg.fit is None and cfg.model.intensity == "softplus"
    res = reconstruct(tiny_stacks, cfg, progress=False)
    assert np.isfinite(res.volume.data).all() and res.volume.data.max() > 0.5
    assert res.model["field"]["intensity"] == "softplus"
    assert (res.slices.weight == 1).all() and (res.slices.intensity_scale == 1).all()
    assert res.slices[["tx_mm", "ty_mm", "tz_mm"]].abs().to_numpy().max() > 1e-3
