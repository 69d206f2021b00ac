import pytest
import torch

from gsvr.ops.knn import knn


@pytest.mark.parametrize("backend", ["kdtree", "faiss", "torch"])
def test_backends_return_the_true_nearest_neighbours(backend):
    g = torch.Generator().manual_seed(0)
    points = torch.rand(2000, 3, generator=g) * 50
    queries = torch.rand(300, 3, generator=g) * 50
    k = 10
    idx = knn(points, queries, k, backend=backend)
    assert idx.shape == (300, k)
    true = torch.cdist(queries.double(), points.double()).topk(k, largest=False).values
    got = (queries[:, None, :].double() - points[idx].double()).norm(dim=-1).sort(dim=1).values
    torch.testing.assert_close(got, true, rtol=1e-5, atol=1e-4)


def test_knn_rejects_k_larger_than_points():
    with pytest.raises(ValueError, match="only 3 points"):
        knn(torch.zeros(3, 3), torch.zeros(1, 3), 5)


def test_the_block_query_returns_every_point_within_its_radius_nearest_first():
    from gsvr.ops.knn import block_query

    g = torch.Generator().manual_seed(0)
    pts = torch.rand(5000, 3, generator=g) * 40
    qs = torch.rand(800, 3, generator=g) * 44 - 2  # some queries outside the points' box
    nbr = block_query(pts, qs, 2.5, 2)
    valid = nbr < len(pts)
    got = torch.zeros(len(qs), len(pts), dtype=torch.bool)
    got[torch.arange(len(qs))[:, None].expand_as(nbr)[valid], nbr[valid]] = True
    dist = torch.cdist(qs, pts)
    assert (got | (dist > 2 * 2.5)).all()  # a superset of the ball of radius 2 blocks
    assert not (got & (dist > 2.5 * 3 * 3 ** 0.5)).any()  # and nothing beyond the cube of 2 + 1 blocks
    d = torch.where(valid, dist.gather(1, nbr.clamp_max(len(pts) - 1)), torch.inf)
    assert (d[:, 1:] >= d[:, :-1] - 1e-4).all()  # nearest first, padding last (cdist rounds differently)
