"""Preprocessing: crop keeps the world geometry, N4 removes a smooth bias, standardisation equalises stacks."""

import numpy as np
import pytest

from gsvr.errors import GsvrError
from gsvr.io.nifti import Stack
from gsvr.preprocess import PreprocessConfig, crop_to_mask, n4_bias_correction, preprocess_stacks, standardise_intensities


def _stack(shape=(80, 70, 12), spacing=(0.8, 0.8, 3.0), name="s"):
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing) @ np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    affine[:3, 3] = (-20.0, 15.0, -7.0)
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    mask = ((x - 45) ** 2 + (y - 30) ** 2 < 15**2) & (z >= 2) & (z <= 9)
    data = np.where(mask, 100.0, 20.0).astype(np.float32)
    return Stack(data=data, mask=mask, affine=affine, thickness_mm=3.0, name=name)


def test_crop_keeps_every_voxel_where_it_was_in_the_world():
    s = _stack()
    c = crop_to_mask(s, margin_mm=4.0)
    assert c.data.shape == (29 + 2 * 5, 29 + 2 * 5, 8)  # the disc spans 29 voxels; 4 mm = 5 pixels
    assert c.mask.sum() == s.mask.sum()
    # Voxel (0, 0, 0) of the crop is voxel (31 - 5, 16 - 5, 2) of the original.
    assert np.allclose(c.affine @ [0, 0, 0, 1], s.affine @ [26, 11, 2, 1])
    assert np.allclose(c.affine[:3, :3], s.affine[:3, :3])
    assert np.array_equal(c.data, s.data[26:65, 11:50, 2:10])
    kept = crop_to_mask(s, margin_mm=4.0, drop_empty_slices=False)  # slice indices stay the input's
    assert kept.data.shape == (39, 39, 12) and np.allclose(kept.affine @ [0, 0, 5, 1], s.affine @ [26, 11, 5, 1])


def test_crop_of_an_empty_mask_names_the_stack():
    s = _stack(name="ax.nii.gz")
    s.mask[:] = False
    with pytest.raises(GsvrError, match="ax.nii.gz: mask is empty"):
        crop_to_mask(s, 5.0)


def test_n4_removes_a_smooth_multiplicative_bias_inside_the_mask():
    s = crop_to_mask(_stack(), 4.0)
    x = np.arange(s.data.shape[0])[:, None, None] / s.data.shape[0]
    biased = Stack(data=(s.data * np.exp(0.6 * (x - 0.5))).astype(np.float32), mask=s.mask, affine=s.affine, thickness_mm=3.0)
    cv = lambda st: st.data[st.mask].std() / st.data[st.mask].mean()
    corrected = n4_bias_correction(biased)
    assert cv(biased) > 0.1
    assert cv(corrected) < 0.3 * cv(biased), (cv(biased), cv(corrected))
    assert abs(np.median(corrected.data[s.mask]) / np.median(biased.data[s.mask]) - 1) < 1e-3


def test_standardisation_brings_the_stacks_to_one_quantile():
    a, b, c = _stack(name="a"), _stack(name="b"), _stack(name="c")
    b = Stack(data=b.data * 3, mask=b.mask, affine=b.affine, thickness_mm=3.0, name="b")
    out = standardise_intensities([a, b, c])
    q = [np.quantile(s.data[s.mask], 0.99) for s in out]
    assert np.allclose(q, q[0], rtol=1e-5) and np.isclose(q[0], 100.0, rtol=1e-5)
    both = preprocess_stacks([a, b], PreprocessConfig(n4=False))
    assert all(s.data.shape[2] == 8 for s in both)
