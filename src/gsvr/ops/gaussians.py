"""The Gaussian forward model.

A volume is V(x) = sum_j c_j exp(-1/2 (x - mu_j)^T Sigma_j^-1 (x - mu_j)) (``exact``), or the
soft-normalised sum of GSVR's Eq. 2 (``normalized``). A slice pixel observes V convolved with
the slice PSF N(0, Sigma_PSF): for a Gaussian that is again a Gaussian,

    (G_j * PSF)(x) = c_j sqrt(det Sigma_j / det Sigma_obs) exp(-1/2 v^T Sigma_obs^-1 v),
    Sigma_obs = Sigma_j + Sigma_PSF,  v = x - mu_j,

so ``exact`` mode is the true convolution up to top-K truncation. ``normalized`` mode is
GSVR's Eq. 5 (Sigma_j replaced by Sigma_obs in Eq. 2).

The fast path evaluates Sigma_obs^-1 and the amplitude once per distinct (slice, Gaussian)
pair ("pair tables", far fewer than (pixel, neighbour) pairs; measured ratio: docs/results.md),
so per (pixel, neighbour) only a quadratic form and an exp remain. :func:`render_reference`
computes the same with full per-(pixel, neighbour) 3x3 matrices and torch.linalg and is the
reference in tests.
"""

from __future__ import annotations

import warnings

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from gsvr.geometry import quaternion_to_matrix

RENDER_MODES = ("exact", "normalized")

# Order of the 6 stored entries of a symmetric 3x3 matrix.
_SYM = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


def gaussian_covariance(log_scales: Tensor, quats: Tensor) -> Tensor:
    """Sigma = R S^2 R^T. log_scales [N, 3] (log of std in mm), quats [N, 4] -> [N, 3, 3]."""
    rot = quaternion_to_matrix(quats)
    return (rot * torch.exp(2.0 * log_scales)[:, None, :]) @ rot.transpose(-1, -2)


def sym_inverse(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Closed-form inverse and log-determinant of symmetric positive-definite 3x3 matrices.

    Args:
        cov: [..., 3, 3].

    Returns:
        (precision [..., 6] in _SYM order, logdet [...]).
    """
    a, b, c = cov[..., 0, 0], cov[..., 0, 1], cov[..., 0, 2]
    d, e, f = cov[..., 1, 1], cov[..., 1, 2], cov[..., 2, 2]
    A00 = d * f - e * e
    A01 = c * e - b * f
    A02 = b * e - c * d
    A11 = a * f - c * c
    A12 = b * c - a * e
    A22 = a * d - b * b
    det = a * A00 + b * A01 + c * A02
    inv_det = 1.0 / det
    prec = torch.stack([A00, A11, A22, A01, A02, A12], dim=-1) * inv_det[..., None]
    return prec, torch.log(det)


@dataclass
class PairTables:
    """Per-(slice, Gaussian) quantities for the fast render path.

    Attributes:
        mean: [Q, 3] Gaussian mean of each pair.
        precision: [Q, 6] Sigma_obs^-1 (symmetric, _SYM order).
        weight: [Q] numerator factor: c_j sqrt(det Sigma_j / det Sigma_obs) (exact) or c_j (normalized).
    """

    mean: Tensor
    precision: Tensor
    weight: Tensor


def pair_tables(
    means: Tensor,
    log_scales: Tensor,
    quats: Tensor,
    values: Tensor,
    psf_cov: Tensor | None,
    pair_slice: Tensor,
    pair_gauss: Tensor,
    *,
    mode: str,
) -> PairTables:
    """Build the pair tables (differentiable in all inputs).

    Args:
        means, log_scales, quats, values: Gaussian parameters [N, 3], [N, 3], [N, 4], [N].
        psf_cov: [M, 3, 3] world PSF covariance per slice, or None (no PSF: sampling the volume).
        pair_slice: [Q] slice index of each pair (ignored when psf_cov is None).
        pair_gauss: [Q] Gaussian index of each pair.
        mode: "exact" or "normalized".
    """
    if mode not in RENDER_MODES:
        raise ValueError(f"unknown render mode {mode!r}; choose from {RENDER_MODES}")
    cov = gaussian_covariance(log_scales, quats)[pair_gauss]  # [Q, 3, 3]
    if psf_cov is not None:
        cov = cov + psf_cov[pair_slice]
    precision, logdet_obs = sym_inverse(cov)
    weight = values[pair_gauss]
    if mode == "exact" and psf_cov is not None:
        logdet_g = 2.0 * log_scales[pair_gauss].sum(-1)
        weight = weight * torch.exp(0.5 * (logdet_g - logdet_obs))
    return PairTables(mean=means[pair_gauss], precision=precision, weight=weight)


def gaussian_sum(x: Tensor, nbr: Tensor, tables: PairTables, *, mode: str, delta: float = 1e-4) -> Tensor:
    """Evaluate the (PSF-blurred) Gaussian sum at points.

    Args:
        x: [P, 3] world positions.
        nbr: [P, K] row indices into the pair tables (the K neighbours of each point).
        tables: pair tables.
        mode: "exact" (plain sum) or "normalized" (divided by sum of weights + delta).
        delta: stabiliser of the normalized mode.

    Returns:
        [P] values.
    """
    v = x[:, None, :] - tables.mean[nbr]  # [P, K, 3]
    p = tables.precision[nbr]  # [P, K, 6]
    v0, v1, v2 = v.unbind(-1)
    maha = (
        p[..., 0] * v0 * v0
        + p[..., 1] * v1 * v1
        + p[..., 2] * v2 * v2
        + 2.0 * (p[..., 3] * v0 * v1 + p[..., 4] * v0 * v2 + p[..., 5] * v1 * v2)
    )  # [P, K]
    w = torch.exp(-0.5 * maha)
    num = (w * tables.weight[nbr]).sum(-1)
    if mode == "normalized":
        return num / (w.sum(-1) + delta)
    return num


def render_reference(
    x: Tensor,
    slice_idx: Tensor,
    nbr_gauss: Tensor,
    means: Tensor,
    log_scales: Tensor,
    quats: Tensor,
    values: Tensor,
    psf_cov: Tensor | None,
    *,
    mode: str,
    delta: float = 1e-4,
) -> Tensor:
    """Plain reference: full 3x3 Sigma_obs per (pixel, neighbour), torch.linalg inverse and det.

    Args:
        x: [P, 3] pixel positions; slice_idx: [P] slice of each pixel; nbr_gauss: [P, K] Gaussian ids.
        psf_cov: [M, 3, 3] or None.

    Returns:
        [P] rendered values.
    """
    rot = quaternion_to_matrix(quats[nbr_gauss])  # [P, K, 3, 3]
    scale2 = torch.exp(2.0 * log_scales[nbr_gauss])  # [P, K, 3]
    cov_g = rot @ torch.diag_embed(scale2) @ rot.transpose(-1, -2)
    cov = cov_g if psf_cov is None else cov_g + psf_cov[slice_idx][:, None]
    v = x[:, None, :] - means[nbr_gauss]
    maha = (v[..., None, :] @ torch.linalg.inv(cov) @ v[..., :, None])[..., 0, 0]
    w = torch.exp(-0.5 * maha)
    c = values[nbr_gauss]
    if mode == "normalized":
        return (w * c).sum(-1) / (w.sum(-1) + delta)
    amp = torch.sqrt(torch.linalg.det(cov_g) / torch.linalg.det(cov)) if psf_cov is not None else 1.0
    return (c * amp * w).sum(-1)


def unique_pairs(slice_idx: Tensor, nbr_gauss: Tensor, n_gauss: int) -> tuple[Tensor, Tensor, Tensor]:
    """Distinct (slice, Gaussian) pairs among the (pixel, neighbour) pairs.

    Args:
        slice_idx: [P] slice of each pixel; nbr_gauss: [P, K] neighbours; n_gauss: N.

    Returns:
        (pair_slice [Q], pair_gauss [Q], nbr_pair [P, K] index of each (pixel, neighbour) pair's row).
    """
    key = slice_idx[:, None].long() * n_gauss + nbr_gauss.long()
    uniq, inverse = torch.unique(key, return_inverse=True)
    return uniq // n_gauss, uniq % n_gauss, inverse.reshape(nbr_gauss.shape)


#: Packed pair-table layout: mean (3), symmetric precision (6, _SYM order), weight (1).
PACKED_WIDTH = 10


def pack_tables(tables: PairTables) -> Tensor:
    """[Q, 10] packed table (differentiable) for :func:`gaussian_sum_packed`."""
    return torch.cat([tables.mean, tables.precision, tables.weight[:, None]], dim=1)


class SumParts(NamedTuple):
    """A packed Gaussian sum over [P] points and what its gradient needs (:func:`gaussian_sum_parts`)."""

    out: Tensor  #: [P] the sum
    den: Tensor | None  #: [P] its denominator (``normalized`` mode; None in ``exact``)
    weight: Tensor  #: [P, K] the neighbours' weights
    v: Tensor  #: [P, K, 3] x - mean
    pv: Tensor  #: [P, K, 3] precision @ v
    w: Tensor  #: [P, K] exp(-v^T P v / 2)


def gaussian_sum_parts(x: Tensor, nbr: Tensor, packed: Tensor, *, mode: str, delta: float = 1e-4) -> SumParts:
    """:func:`gaussian_sum_packed` without autograd, with the intermediates its gradient needs: a caller that asks
    for the gradient later (:func:`gaussian_sum_parts_backward`) does not evaluate the sum again."""
    rows = packed.index_select(0, nbr.reshape(-1)).reshape(*nbr.shape, PACKED_WIDTH)  # [P, K, 10]
    v = x[:, None, :] - rows[..., 0:3]  # [P, K, 3]
    v0, v1, v2 = v.unbind(-1)
    p00, p11, p22, p01, p02, p12, weight = rows[..., 3:].unbind(-1)
    pv = torch.stack([p00 * v0 + p01 * v1 + p02 * v2, p01 * v0 + p11 * v1 + p12 * v2, p02 * v0 + p12 * v1 + p22 * v2], -1)
    w = torch.exp(-0.5 * (v * pv).sum(-1))  # [P, K]
    num = (weight * w).sum(-1)
    if mode != "normalized":
        return SumParts(num, None, weight.contiguous(), v, pv, w)
    den = w.sum(-1) + delta
    return SumParts(num / den, den, weight.contiguous(), v, pv, w)


def gaussian_sum_row_grads(parts: SumParts, grad_out: Tensor) -> Tensor:
    """[P, K, 10] the gradient in each point's K packed rows of a loss whose gradient in the sum :func:`gaussian_sum_parts`
    returned as ``parts`` is ``grad_out`` [P]: what :func:`gaussian_sum_parts_backward` adds into the table.

    With e = v^T P v (P symmetric): de/dv = 2 P v, de/dP_aa = v_a^2, de/dP_ab = 2 v_a v_b."""
    if parts.den is not None:  # normalized
        g = (grad_out / parts.den)[:, None]
        g_w = g * (parts.weight - parts.out[:, None])
    else:
        g = grad_out[:, None]
        g_w = g * parts.weight
    w, v = parts.w, parts.v
    h = -0.5 * g_w * w  # dL/de  [P, K]
    # The rows' gradients written in place (no gather over the last dimension, no concatenation): the mean's
    # -dL/dv = -2 h P v, the precision's h v_a v_b (twice off the diagonal), the weight's g w.
    rows = torch.empty(*w.shape, PACKED_WIDTH, dtype=w.dtype, device=w.device)
    rows[..., 0:3] = parts.pv * (-2.0 * h)[..., None]
    v0, v1, v2 = v.unbind(-1)
    hv0, hv1 = h * v0, h * v1
    rows[..., 3], rows[..., 4], rows[..., 5] = hv0 * v0, hv1 * v1, h * v2 * v2
    rows[..., 6], rows[..., 7], rows[..., 8] = 2.0 * hv0 * v1, 2.0 * hv0 * v2, 2.0 * hv1 * v2
    rows[..., 9] = g * w
    return rows


def gaussian_sum_parts_backward(parts: SumParts, nbr: Tensor, grad_out: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """The gradients in the points [P, 3] and in the packed table [n_rows, 10] of a loss whose gradient in the sum
    :func:`gaussian_sum_parts` returned as ``parts`` (with the neighbours ``nbr`` [P, K]) is ``grad_out`` [P]."""
    rows = gaussian_sum_row_grads(parts, grad_out)
    g_packed = torch.zeros(n_rows, PACKED_WIDTH, dtype=rows.dtype, device=rows.device)
    g_packed.index_add_(0, nbr.reshape(-1), rows.reshape(-1, PACKED_WIDTH))
    return -rows[..., 0:3].sum(1), g_packed


def scatter_matrices(index: Tensor, n_rows: int, chunk: int, *, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """The scatter-adds of ``index`` [V, K] into ``n_rows`` rows, ``chunk`` rows of it at a time, as [n_rows, n] sparse
    matrices (CSR, int32 indices, unit values of ``dtype``; n the entries of a chunk, in their row-major order):
    ``m @ x`` sums the x[i] of each index, as ``zeros.index_add_(0, index_chunk.reshape(-1), x)`` does; measured on
    torch 2.13's CPU build, the same sums to the bit (each row's entries added in their order).

    On the CPU, index_add_ adds one entry at a time on one thread; the sparse product adds the rows on all cores, about
    three times faster on 2 (docs/results.md section 29): worth it where one index serves several scatters (a
    neighbour table between rebuilds). All the matrices' indices live in two buffers allocated first (4 bytes per
    entry, and per chunk 4 bytes per row), and their values in one vector of ones, so the temporaries of the sorts
    leave no holes between kept pieces in the heap."""
    width, n_chunks = index.shape[1], -(-len(index) // chunk)
    if max(chunk * width, n_rows + 1) >= 2**31:
        raise ValueError(f"scatter_matrices: chunks of {chunk * width} entries into {n_rows} rows do not fit int32 indices")
    cols = torch.empty(index.numel(), dtype=torch.int32, device=index.device)
    crows = torch.zeros(n_chunks, n_rows + 1, dtype=torch.int32, device=index.device)
    ones = torch.ones(min(chunk, len(index)) * width, dtype=dtype, device=index.device)
    out = []
    for i, start in enumerate(range(0, len(index), chunk)):
        idx = index[start : start + chunk].reshape(-1)
        col = cols[start * width : start * width + len(idx)]
        col.copy_(torch.argsort(idx, stable=True))
        counts = torch.bincount(idx, minlength=n_rows)
        if len(counts) != n_rows:  # (bincount refuses negative ones)
            raise ValueError(f"scatter_matrices: an index outside [0, {n_rows})")
        torch.cumsum(counts, 0, out=crows[i, 1:])
        with warnings.catch_warnings():  # "sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            out.append(torch.sparse_csr_tensor(crows[i], col, ones[: len(idx)], size=(n_rows, len(idx))))
    return out


class _PackedGaussianSum(torch.autograd.Function):
    """Forward and hand-written backward of :func:`gaussian_sum` on a packed table: one gather of [P, K, 10] rows
    forward, one index_add_ of [P, K, 10] rows backward."""

    @staticmethod
    def forward(ctx, x: Tensor, packed: Tensor, nbr: Tensor, normalized: bool, delta: float) -> Tensor:
        parts = gaussian_sum_parts(x, nbr, packed, mode="normalized" if normalized else "exact", delta=delta)
        ctx.n_rows, ctx.normalized = packed.shape[0], normalized
        ctx.save_for_backward(nbr, parts.weight, parts.v, parts.pv, parts.w, parts.out,
                              parts.den if normalized else parts.out)  # tensors only: out stands in for den
        return parts.out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        nbr, weight, v, pv, w, out, den = ctx.saved_tensors
        parts = SumParts(out, den if ctx.normalized else None, weight, v, pv, w)
        return *gaussian_sum_parts_backward(parts, nbr, grad_out, ctx.n_rows), None, None, None


def gaussian_sum_packed(x: Tensor, nbr: Tensor, packed: Tensor, *, mode: str, delta: float = 1e-4) -> Tensor:
    """Same contract as :func:`gaussian_sum` on a packed table, with a fused backward."""
    return _PackedGaussianSum.apply(x, packed, nbr, mode == "normalized", delta)
