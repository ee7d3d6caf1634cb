"""Spectral signatures: the squared projection on the top singular vector, the per-label 1.5*eps rule."""
from __future__ import annotations

import math

import pytest
import torch

from backdoorlab import detectors
from backdoorlab.data.bundle import to_float
from backdoorlab.models.base import ImageClassifier


class Identity(ImageClassifier):
    """embed = the flattened image, so tests control the representations exactly."""

    def __init__(self):
        super().__init__((0.0,), (1.0,))

    def embed(self, x):
        return x.flatten(1)

    def classify(self, z):
        return z[:, :2]


def synthetic(n=120, poisoned=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 0.5 + 0.05 * torch.randn(n, 1, 4, 4, generator=g)
    y = torch.arange(n) % 2
    idx = torch.nonzero(y == 0).flatten()[:poisoned]
    x[idx, 0, 0, 0] += 0.4  # a strong, consistent shift along one direction
    truth = torch.zeros(n, dtype=torch.bool)
    truth[idx] = True
    return x.clamp(0, 1), y, truth


def test_registered():
    assert "spectral" in detectors.names()
    assert detectors.create("spectral").kind == "dataset"


def test_scores_find_the_shifted_samples_and_flag_rule_per_label():
    x, y, truth = synthetic()
    # a minority (20 %) of label 0 is poisoned: with eps 0.2, 30 % of every label is flagged
    det = detectors.create("spectral", eps=0.2)
    scores = det.score(Identity(), x, y, None)
    assert scores.shape == (len(x),) and torch.isfinite(scores).all()
    target = y == 0
    assert scores[target & truth].min() > scores[target & ~truth].max()
    flagged = det.flag(scores, y)
    for label in (0, 1):
        assert int(flagged[y == label].sum()) == math.floor(1.5 * 0.2 * int((y == label).sum()))
    assert flagged[truth].all()


def test_score_is_squared_projection_on_top_singular_vector():
    x, y, _ = synthetic()
    scores = detectors.create("spectral").score(Identity(), x, y, None)
    reps = to_float(x).flatten(1)[y == 1]
    c = reps - reps.mean(0)
    v = torch.linalg.svd(c, full_matrices=False).Vh[0]
    torch.testing.assert_close(scores[y == 1], (c @ v) ** 2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("params", [{"eps": 0}, {"eps": 1.5}, {"removal_factor": 0}, {"eps": 0.9}])
def test_bad_hyperparameters(params):
    with pytest.raises(ValueError, match="must be"):
        detectors.create("spectral", **params)
