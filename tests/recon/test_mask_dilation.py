"""In-plane growth of the slice masks before reconstruction."""

import numpy as np

from gsvr.io.nifti import Stack
from gsvr.preprocess.stacks import dilate_masks_inplane


def test_masks_grow_in_plane_only_and_empty_slices_stay_empty():
    mask = np.zeros((21, 21, 5), bool)
    mask[10, 10, 2] = True
    affine = np.diag([0.5, 0.5, 3.0, 1.0])
    stack = Stack(data=np.ones(mask.shape, np.float32), mask=mask, affine=affine, thickness_mm=3.0)
    grown = dilate_masks_inplane([stack], 2.0)[0].mask
    assert not grown[:, :, [0, 1, 3, 4]].any()  # not through the plane
    ii, jj = np.nonzero(grown[:, :, 2])
    dist = np.hypot((ii - 10) * 0.5, (jj - 10) * 0.5)
    assert dist.max() <= 2.0 and grown[10, 14, 2] and grown[14, 10, 2] and not grown[13, 13, 2]  # a disc of 2 mm
    assert dilate_masks_inplane([stack], 0.0)[0].mask is mask
