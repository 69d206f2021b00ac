"""CUDA against CPU: the Gaussian forward op (values and gradients), k nearest neighbours, field sampling.

Marked ``gpu``: skipped without a CUDA device (tests/conftest.py). The same neighbour indices feed both
devices, so the op itself is compared; knn is compared separately (by distances: ties may swap).
"""

import pytest
import torch
from torch.testing import assert_close

from gsvr.geometry import axis_angle_to_matrix
from gsvr.model.field import GaussianField
from gsvr.ops.gaussians import gaussian_sum, gaussian_sum_packed, pack_tables, pair_tables, unique_pairs
from gsvr.ops.knn import knn
from gsvr.ops.psf import psf_covariance_world, psf_sigmas_mm

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
# float64: both devices are IEEE double; only summation order (index_add_ on CUDA) and exp differ.
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=2e-4, atol=2e-5)}


def _case(dtype, n=64, p=300, k=8, m=4, seed=0):
    """A small random field, PSFs of m slices, points with their slices and top-k neighbours (computed on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g, dtype=torch.float64) * 3.0
    log_scales = torch.rand(n, 3, generator=g, dtype=torch.float64) * 1.2 - 0.4
    quats = torch.randn(n, 4, generator=g, dtype=torch.float64)
    values = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    axes = axis_angle_to_matrix(torch.randn(m, 3, generator=g, dtype=torch.float64))
    psf = psf_covariance_world(axes, torch.tensor([psf_sigmas_mm((0.8, 0.8), 3.0)], dtype=torch.float64).repeat(m, 1))
    x = torch.randn(p, 3, generator=g, dtype=torch.float64) * 3.0
    slice_idx = torch.randint(0, m, (p,), generator=g)
    nbr = knn(means, x, k, backend="kdtree")
    weights = torch.rand(p, generator=g, dtype=torch.float64)  # a loss that weighs every output differently
    cast = lambda t: t.to(dtype)
    return [cast(t) for t in (means, log_scales, quats, values)], cast(psf), cast(x), slice_idx, nbr, cast(weights)


def _render(case, device, *, mode, with_psf, packed):
    """Values and gradients (x and the four parameter tensors) of the fast path on ``device``."""
    params, psf, x, slice_idx, nbr, weights = case
    params = [t.to(device).requires_grad_() for t in params]
    x = x.to(device).requires_grad_()
    slice_idx, nbr, weights = slice_idx.to(device), nbr.to(device), weights.to(device)
    n = params[0].shape[0]
    if with_psf:
        pair_slice, pair_gauss, nbr_pair = unique_pairs(slice_idx, nbr, n)
        psf = psf.to(device)
    else:
        pair_slice, pair_gauss, nbr_pair, psf = torch.zeros(n, dtype=torch.long, device=device), torch.arange(n, device=device), nbr, None
    tables = pair_tables(*params, psf, pair_slice, pair_gauss, mode=mode)
    if packed:
        out = gaussian_sum_packed(x, nbr_pair, pack_tables(tables), mode=mode)
    else:
        out = gaussian_sum(x, nbr_pair, tables, mode=mode)
    grads = torch.autograd.grad((out * weights).sum(), [x, *params])
    return out.detach(), [gr.detach() for gr in grads]


def _compare(device, dtype, mode, with_psf, packed):
    case = _case(dtype)
    ref_out, ref_grads = _render(case, torch.device("cpu"), mode=mode, with_psf=with_psf, packed=packed)
    out, grads = _render(case, device, mode=mode, with_psf=with_psf, packed=packed)
    assert out.device.type == device.type and out.dtype == dtype
    assert ref_out.abs().max() > 0.5  # the points see their Gaussians: a non-trivial comparison
    tol = TOL[dtype]
    assert_close(out.cpu(), ref_out, **tol)
    for name, a, b in zip(("x", "means", "log_scales", "quats", "values"), grads, ref_grads):
        assert b.abs().max() > 0, name
        # Gradients sum many rows (index_add_): tolerance relative to the largest entry.
        assert_close(a.cpu(), b, rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * float(b.abs().max()), msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode", ["exact", "normalized"])
@pytest.mark.parametrize("with_psf", [True, False], ids=["psf", "nopsf"])
def test_the_packed_op_on_cuda_matches_the_cpu_in_values_and_gradients(dtype, mode, with_psf):
    _compare(CUDA, dtype, mode, with_psf, packed=True)


@pytest.mark.parametrize("mode", ["exact", "normalized"])
def test_the_autograd_op_on_cuda_matches_the_cpu_in_values_and_gradients(mode):
    _compare(CUDA, torch.float32, mode, with_psf=True, packed=False)


def _knn_distances(points, queries, idx):
    return (queries[:, None, :].double().cpu() - points.double().cpu()[idx.cpu()]).norm(dim=-1)


def _compare_knn(device, backend):
    g = torch.Generator().manual_seed(1)
    points = torch.rand(2000, 3, generator=g) * 50
    queries = torch.rand(300, 3, generator=g) * 50
    k = 10
    ref = knn(points, queries, k, backend="kdtree")
    idx = knn(points.to(device), queries.to(device), k, backend=backend)
    assert idx.device.type == device.type and idx.dtype == torch.int64 and idx.shape == (300, k)
    # Nearest first, and the same k distances as on the CPU (a near tie may swap two neighbours).
    got = _knn_distances(points, queries, idx)
    assert (got.diff(dim=1) >= -1e-4).all()
    assert_close(got, _knn_distances(points, queries, ref), rtol=0, atol=1e-3)


@pytest.mark.parametrize("backend", ["auto", "torch", "faiss"])
def test_knn_on_cuda_finds_the_cpu_neighbours(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    _compare_knn(CUDA, backend)


def _compare_field_sample(device):
    g = torch.Generator().manual_seed(2)
    n = 96
    field = GaussianField((torch.rand(n, 3, generator=g) - 0.5) * 20, torch.log(0.8 + torch.rand(n, 3, generator=g)),
                          torch.randn(n, 4, generator=g), 0.5 + torch.rand(n, generator=g), mode="exact")
    pts = (torch.rand(2000, 3, generator=g) - 0.5) * 20
    ref = field.sample(pts, k=n)  # every Gaussian: no truncation, so neighbour order is all that may differ
    on_device = GaussianField.from_state(field.state(), device)
    got = on_device.sample(pts.to(device), k=n, chunk=512)
    assert got.device.type == device.type
    assert ref.max() > 0.5
    assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-5)


def test_field_sampling_on_cuda_matches_the_cpu():
    _compare_field_sample(CUDA)
