"""Slice point spread function (PSF) as a Gaussian covariance.

In the slice frame the PSF is diagonal: in-plane FWHM = 1.2 x pixel spacing, through-plane
FWHM = slice thickness (SVRTK, NiftyMIC, GSVR). In world space it is rotated with the slice:
Sigma_PSF,world = A diag(sigma^2) A^T, with A the slice's [3, 3] axes (x, y, normal) as columns.
"""

from __future__ import annotations

import math

from torch import Tensor

#: sigma = FWHM * FWHM_TO_SIGMA for a Gaussian.
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
#: In-plane PSF FWHM in units of the in-plane pixel spacing.
INPLANE_FWHM_FACTOR = 1.2


def psf_sigmas_mm(inplane_spacing_mm: tuple[float, float], thickness_mm: float) -> tuple[float, float, float]:
    """(sigma_x, sigma_y, sigma_z) of the slice PSF in the slice frame, millimetres."""
    rx, ry = inplane_spacing_mm
    return (
        INPLANE_FWHM_FACTOR * rx * FWHM_TO_SIGMA,
        INPLANE_FWHM_FACTOR * ry * FWHM_TO_SIGMA,
        thickness_mm * FWHM_TO_SIGMA,
    )


def psf_covariance_world(axes: Tensor, sigmas_mm: Tensor) -> Tensor:
    """World-space PSF covariance of each slice.

    Args:
        axes: [M, 3, 3] slice axes in world space (columns: in-plane x, in-plane y, normal).
        sigmas_mm: [M, 3] PSF standard deviations along those axes.

    Returns:
        [M, 3, 3] covariance matrices.
    """
    return (axes * sigmas_mm[:, None, :].square()) @ axes.transpose(-1, -2)
