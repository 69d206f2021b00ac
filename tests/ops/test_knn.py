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
