"""The voxel-grid slice acquisition operator: adjoint, PSF quadrature, geometry."""

import math

import pytest
import torch

from gsvr.ops.voxel import (VoxelGrid, _transpose, acquire, acquire_adjoint, acquisition_matrices, psf_nodes,
                            psf_offsets)


def _random_slices(n_pix: int, grid: VoxelGrid, gen: torch.Generator):
    lo = torch.tensor(grid.corner_mm) + 3.0
    hi = lo + torch.tensor([(n - 1) * grid.spacing_mm for n in grid.shape]) - 6.0
    x = lo + torch.rand(n_pix, 3, generator=gen, dtype=torch.float64) * (hi - lo)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    axes = q[None]  # one slice
    sigma = torch.tensor([[0.4, 0.4, 1.3]], dtype=torch.float64)
    return x, axes, sigma


@pytest.mark.parametrize("orders", [(1, 1), (5, 1), (5, 3)])
def test_acquire_adjoint_passes_the_dot_product_test(orders):
    gen = torch.Generator().manual_seed(0)
    grid = VoxelGrid((-10.0, -12.0, -8.0), 1.0, (21, 25, 17))
    x, axes, sigma = _random_slices(500, grid, gen)
    nodes, w = psf_nodes(*orders, dtype=torch.float64)
    off = psf_offsets(axes, sigma, nodes)[torch.zeros(len(x), dtype=torch.long)]
    v = torch.randn(grid.shape, generator=gen, dtype=torch.float64)
    u = torch.randn(len(x), generator=gen, dtype=torch.float64)
    lhs = (acquire(v, grid, x, off, w) * u).sum()
    rhs = (v * acquire_adjoint(u, grid, x, off, w)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=0)


@pytest.mark.parametrize("orders", [(1, 1), (5, 1), (5, 3)])
def test_acquisition_matrix_is_the_operator_and_its_transpose_the_adjoint(orders):
    """Pixels inside, near and beyond the grid's faces (corners off the grid read zero), built in several chunks."""
    gen = torch.Generator().manual_seed(2)
    grid = VoxelGrid((-10.0, -12.0, -8.0), 1.0, (21, 25, 17))
    x, axes, sigma = _random_slices(700, grid, gen)
    x = x + torch.randn(len(x), 3, generator=gen, dtype=torch.float64) * 4.0  # some PSF nodes leave the grid
    nodes, w = psf_nodes(*orders, dtype=torch.float64)
    off = psf_offsets(axes, sigma, nodes)[torch.zeros(len(x), dtype=torch.long)]
    v = torch.randn(grid.shape, generator=gen, dtype=torch.float64)
    u = torch.randn(len(x), generator=gen, dtype=torch.float64)
    a, a_t = acquisition_matrices(grid, x, off, w, chunk=256)
    assert a.shape == (700, 21 * 25 * 17) and a.col_indices().dtype == a_t.col_indices().dtype == torch.int32
    for m in (a, a_t):  # torch's CSR invariants (rows' columns sorted and distinct), which the products assume
        torch.sparse_csr_tensor(m.crow_indices(), m.col_indices(), m.values(), m.shape, check_invariants=True)
    assert torch.equal(a_t.to_dense(), a.to_dense().T)
    # the transpose by a stable sort (the CUDA path) is the same matrix as the counting sort's (the CPU path)
    by_sort = _transpose(a.crow_indices(), a.col_indices(), a.values(), tuple(a.shape), counting=False)
    for part in ("crow_indices", "col_indices", "values"):
        assert torch.equal(getattr(by_sort, part)(), getattr(a_t, part)())
    torch.testing.assert_close(torch.mv(a, v.reshape(-1)), acquire(v, grid, x, off, w), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.mv(a_t, u).reshape(grid.shape), acquire_adjoint(u, grid, x, off, w),
                               rtol=1e-10, atol=1e-12)


def test_psf_quadrature_integrates_a_quadratic_volume_exactly():
    """Trilinear interpolation of a quadratic has error; on a fine grid the Gauss-Hermite PSF
    integral of f(x) = |x|^2 must match the closed form |x|^2 + trace(Sigma_PSF)."""
    gen = torch.Generator().manual_seed(1)
    grid = VoxelGrid((-12.0, -12.0, -12.0), 0.1, (241, 241, 241))
    pts = grid.points(dtype=torch.float64)
    vol = pts.square().sum(-1)
    x, axes, sigma = _random_slices(200, VoxelGrid((-10.0, -10.0, -10.0), 1.0, (21, 21, 21)), gen)
    nodes, w = psf_nodes(5, 3, dtype=torch.float64)
    off = psf_offsets(axes, sigma, nodes)[torch.zeros(len(x), dtype=torch.long)]
    got = acquire(vol, grid, x, off, w)
    want = x.square().sum(-1) + sigma.square().sum()
    # Trilinear error of a quadratic is at most 3 * h^2 / 4 per node.
    torch.testing.assert_close(got, want, rtol=0, atol=3 * 0.1**2 / 4 + 1e-9)


def test_grid_normalised_coordinates_hit_voxel_centres():
    grid = VoxelGrid((1.0, 2.0, 3.0), 0.5, (4, 5, 6))
    vol = torch.arange(4 * 5 * 6, dtype=torch.float64).reshape(4, 5, 6)
    pts = grid.points(dtype=torch.float64).reshape(-1, 3)
    nodes, w = psf_nodes(1, 1, dtype=torch.float64)
    off = torch.zeros(len(pts), 1, 3, dtype=torch.float64)
    torch.testing.assert_close(acquire(vol, grid, pts, off, w), vol.reshape(-1))
    assert math.isclose(grid.affine(torch.zeros(3).numpy())[0, 3], 1.0)


def test_acquisition_matrix_in_float32_and_of_no_pixels():
    gen = torch.Generator().manual_seed(4)
    grid = VoxelGrid((-10.0, -12.0, -8.0), 0.8, (26, 31, 21))
    x, axes, sigma = _random_slices(300, grid, gen)
    nodes, w = psf_nodes(5, 1)
    off = psf_offsets(axes.float(), sigma.float(), nodes)[torch.zeros(len(x), dtype=torch.long)]
    v = torch.randn(grid.shape, generator=gen)
    a, _ = acquisition_matrices(grid, x.float(), off, w)
    assert a.dtype == torch.float32
    torch.testing.assert_close(torch.mv(a, v.reshape(-1)), acquire(v, grid, x.float(), off, w), rtol=1e-5, atol=1e-5)
    a, a_t = acquisition_matrices(grid, x[:0].float(), off[:0], w)
    assert a.shape == (0, 26 * 31 * 21) and torch.mv(a_t, torch.zeros(0)).abs().sum() == 0
    with pytest.raises(ValueError, match="2 voxels"):
        acquisition_matrices(VoxelGrid((0.0, 0.0, 0.0), 1.0, (5, 1, 5)), x.float(), off, w)
