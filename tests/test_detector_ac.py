"""Activation clustering: batched 2-means, exact silhouette, the size + silhouette rule."""
from __future__ import annotations

import pytest
import torch

from backdoorlab import detectors, metrics
from backdoorlab.detectors.ac import kmeans2, silhouette
from test_detector_spectral import Identity


def test_kmeans_separates_two_blobs():
    g = torch.Generator().manual_seed(0)
    pts = torch.cat([torch.randn(40, 3, generator=g), torch.randn(15, 3, generator=g) + 8])
    assign = kmeans2(pts, restarts=5, iters=20, generator=torch.Generator().manual_seed(1))
    assert len(set(assign[:40].tolist())) == 1 and len(set(assign[40:].tolist())) == 1
    assert assign[0] != assign[-1]


def test_silhouette_matches_definition():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(12, 2, generator=g)
    assign = torch.tensor([0] * 5 + [1] * 7)
    d = torch.cdist(pts, pts)
    s = []
    for i in range(12):
        own = assign == assign[i]
        a = d[i][own].sum() / (own.sum() - 1)
        b = d[i][~own].mean()
        s.append((b - a) / max(a, b))
    torch.testing.assert_close(silhouette(pts, assign, chunk=5), torch.stack(s).mean())


def test_detector_flags_the_separated_small_cluster():
    g = torch.Generator().manual_seed(0)
    n = 200
    x = 0.5 + 0.03 * torch.randn(n, 1, 2, 2, generator=g)  # 4-dim representations
    y = torch.arange(n) % 2
    truth = torch.zeros(n, dtype=torch.bool)
    idx = torch.nonzero(y == 0).flatten()[:30]  # 30 % of label 0
    x[idx, 0, 0, :] += 0.4
    truth[idx] = True
    det = detectors.create("ac")
    scores = det.score(Identity(), x.clamp(0, 1), y, None)
    flagged = det.flag(scores, y)
    assert flagged[truth].all()
    assert metrics.auc(scores, truth) > 0.99


def test_flag_needs_score_first():
    with pytest.raises(ValueError, match="score"):
        detectors.create("ac").flag(torch.zeros(3), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("params", [{"n_dims": 0}, {"size_threshold": 0.7}, {"silhouette_threshold": 2},
                                    {"restarts": 0}])
def test_bad_hyperparameters(params):
    with pytest.raises(ValueError, match="must be"):
        detectors.create("ac", **params)
