import pytest
import torch
from torch.testing import assert_close

from gsvr.geometry import axis_angle_to_matrix
from gsvr.ops.gaussians import (
    gaussian_sum,
    gaussian_sum_packed,
    pack_tables,
    pair_tables,
    render_reference,
    scatter_matrices,
    unique_pairs,
)
from gsvr.ops.psf import psf_covariance_world, psf_sigmas_mm


def _field(n, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g, dtype=dtype) * 2.0
    log_scales = (torch.rand(n, 3, generator=g, dtype=dtype) * 1.2 - 0.4)
    quats = torch.randn(n, 4, generator=g, dtype=dtype)
    values = torch.rand(n, generator=g, dtype=dtype) + 0.5
    return means, log_scales, quats, values


def _psf(m, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    axes = axis_angle_to_matrix(torch.randn(m, 3, generator=g, dtype=dtype))
    sig = torch.tensor([psf_sigmas_mm((0.8, 0.8), 3.0)], dtype=dtype).repeat(m, 1)
    return psf_covariance_world(axes, sig)


def test_psf_sigmas_follow_fwhm_convention():
    sx, sy, sz = psf_sigmas_mm((0.8, 0.8), 3.0)
    assert sx == pytest.approx(1.2 * 0.8 / 2.3548, rel=1e-4)
    assert sz == pytest.approx(3.0 / 2.3548, rel=1e-4)


def test_exact_psf_closed_form_matches_monte_carlo():
    """(V * PSF)(x) analytic vs the mean of V(x + u), u ~ N(0, Sigma_PSF), all Gaussians summed."""
    n, m = 12, 3
    means, log_scales, quats, values = _field(n)
    psf = _psf(m)
    x = means[:m] + torch.randn(m, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.5
    slice_idx = torch.arange(m)
    nbr = torch.arange(n).repeat(m, 1)
    pair_slice, pair_gauss, nbr_pair = unique_pairs(slice_idx, nbr, n)
    tables = pair_tables(means, log_scales, quats, values, psf, pair_slice, pair_gauss, mode="exact")
    analytic = gaussian_sum(x, nbr_pair, tables, mode="exact")
    no_psf = pair_tables(means, log_scales, quats, values, None, torch.arange(n), torch.arange(n), mode="exact")
    g = torch.Generator().manual_seed(4)
    samples = 400_000
    for i in range(m):
        chol = torch.linalg.cholesky(psf[i])
        u = torch.randn(samples, 3, generator=g, dtype=torch.float64) @ chol.T
        pts = x[i] + u
        vals = gaussian_sum(pts, torch.arange(n).repeat(samples, 1), no_psf, mode="exact")
        mc = vals.mean()
        assert abs(float(analytic[i] / mc) - 1.0) < 0.01, (float(analytic[i]), float(mc))


@pytest.mark.parametrize("mode", ["exact", "normalized"])
@pytest.mark.parametrize("with_psf", [True, False])
def test_fast_path_matches_reference_values_and_gradients(mode, with_psf):
    n, p, k, m = 40, 50, 8, 4
    params = [t.requires_grad_() for t in _field(n)]
    means, log_scales, quats, values = params
    psf = _psf(m) if with_psf else None
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(p, 3, generator=g, dtype=torch.float64) * 2.0).requires_grad_()
    slice_idx = torch.randint(0, m, (p,), generator=g)
    nbr = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(p)])
    ref = render_reference(x, slice_idx, nbr, means, log_scales, quats, values, psf, mode=mode)
    ref_grads = torch.autograd.grad(ref.sum(), [x, *params])
    if psf is None:
        pair_slice, pair_gauss, nbr_pair = torch.zeros(n, dtype=torch.long), torch.arange(n), nbr
    else:
        pair_slice, pair_gauss, nbr_pair = unique_pairs(slice_idx, nbr, n)
    for fast in ("autograd", "packed"):
        tables = pair_tables(means, log_scales, quats, values, psf, pair_slice, pair_gauss, mode=mode)
        if fast == "packed":
            out = gaussian_sum_packed(x, nbr_pair, pack_tables(tables), mode=mode)
        else:
            out = gaussian_sum(x, nbr_pair, tables, mode=mode)
        assert_close(out, ref, rtol=1e-10, atol=1e-12)
        grads = torch.autograd.grad(out.sum(), [x, *params])
        for a, b in zip(grads, ref_grads):
            assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mode", ["exact", "normalized"])
def test_packed_gradcheck_float64(mode):
    g = torch.Generator().manual_seed(6)
    q, p, k = 6, 5, 3
    mean = torch.randn(q, 3, generator=g, dtype=torch.float64)
    a = torch.randn(q, 3, 3, generator=g, dtype=torch.float64)
    prec = a @ a.transpose(1, 2) * 0.3 + torch.eye(3, dtype=torch.float64)
    sym = torch.stack([prec[:, 0, 0], prec[:, 1, 1], prec[:, 2, 2], prec[:, 0, 1], prec[:, 0, 2], prec[:, 1, 2]], 1)
    weight = torch.rand(q, 1, generator=g, dtype=torch.float64)
    packed = torch.cat([mean, sym, weight], 1).requires_grad_()
    x = torch.randn(p, 3, generator=g, dtype=torch.float64, requires_grad=True)
    nbr = torch.randint(0, q, (p, k), generator=g)
    assert torch.autograd.gradcheck(lambda xx, pp: gaussian_sum_packed(xx, nbr, pp, mode=mode), (x, packed))


def test_unique_pairs_index_back_to_the_same_pairs():
    slice_idx = torch.tensor([0, 0, 1, 2, 2])
    nbr = torch.tensor([[3, 1], [1, 2], [3, 1], [0, 3], [3, 0]])
    ps, pg, inv = unique_pairs(slice_idx, nbr, 5)
    assert torch.equal(ps[inv], slice_idx[:, None].expand_as(nbr))
    assert torch.equal(pg[inv], nbr)
    assert len(ps) == 7  # (0,1) (0,2) (0,3) (1,1) (1,3) (2,0) (2,3)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_the_scatter_matrices_add_what_index_add_adds(dtype):
    """Per chunk of rows of the index: every entry into its index's row, repeated indices summed, other rows zero: the
    sums of index_add_ into zeros to the bit (the same additions in the same order). The last chunk is shorter. Float64
    values get float64 matrices; an index beyond the rows is refused."""
    g = torch.Generator().manual_seed(3)
    index = torch.randint(0, 300, (500, 8), generator=g).to(dtype)
    index[::5, 0] = 7  # one row with many entries
    x = torch.randn(500, 8, 10, generator=g)
    matrices = scatter_matrices(index, 400, 120)
    assert len(matrices) == 5
    for i, m in enumerate(matrices):
        idx, xi = index[120 * i : 120 * (i + 1)].reshape(-1).long(), x[120 * i : 120 * (i + 1)].reshape(-1, 10)
        assert m.shape == (400, len(idx)) and m.col_indices().dtype == torch.int32
        assert torch.equal(m @ xi, torch.zeros(400, 10).index_add_(0, idx, xi))
    m64 = scatter_matrices(index, 400, 120, dtype=torch.float64)[0]
    assert torch.equal(m64 @ x[:120].reshape(-1, 10).double(),
                       torch.zeros(400, 10, dtype=torch.float64).index_add_(0, index[:120].reshape(-1).long(),
                                                                            x[:120].reshape(-1, 10).double()))
    with pytest.raises(ValueError, match="outside"):
        scatter_matrices(index, 250, 120)
