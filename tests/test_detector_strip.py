"""STRIP: entropy of superimposed copies, threshold from the clean data only (FRR)."""
from __future__ import annotations

import pytest
import torch

from backdoorlab import detectors, models
from backdoorlab.data.bundle import TensorBundle
from backdoorlab.models.base import ImageClassifier


class TriggerModel(ImageClassifier):
    """Confidently predicts class 0 when pixel (0, 0) is bright (a trigger survives a 0.5 blend);
    otherwise a near-uniform, input-dependent prediction."""

    def __init__(self):
        super().__init__((0.0,), (1.0,))
        self.w = torch.nn.Parameter(torch.randn(16, 10, generator=torch.Generator().manual_seed(0)) * 0.3)

    def embed(self, x):
        return x.flatten(1)

    def classify(self, z):
        trigger = (z[:, :1] > 0.4).float()
        return z @ self.w + 30 * trigger * torch.nn.functional.one_hot(torch.zeros(len(z), dtype=torch.long), 10)


def bundle(x):
    y = torch.zeros(len(x), dtype=torch.long)
    return TensorBundle("t", x, y, x[:2], y[:2], 10, (0.0,), (1.0,))


def images(n, seed):
    x = torch.randint(0, 100, (n, 1, 4, 4), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    x[:, 0, 0, 0] = 0
    return x


def test_trigger_inputs_score_higher_and_are_flagged():
    clean = bundle(images(40, 0))
    suspects = images(20, 1)
    suspects[10:, 0, 0, 0] = 255
    det = detectors.create("strip", n_overlays=16, chunk_images=50)
    scores = det.score(TriggerModel(), suspects, None, clean)
    assert scores.shape == (20,) and det.threshold_ is not None
    assert scores[10:].min() > scores[:10].max()
    flagged = det.flag(scores, None)
    assert flagged[10:].all() and not flagged[:10].any()


def test_threshold_uses_only_clean_data_and_is_seeded():
    clean = bundle(images(30, 0))
    model = models.create("preactresnet18", 10, 1, width=4)
    det = detectors.create("strip", n_overlays=8)
    a = det.score(model, images(6, 2), None, clean, seed=3)
    t1 = det.threshold_
    b = det.score(model, images(9, 4), None, clean, seed=3)  # other suspects, same clean data -> same threshold
    assert det.threshold_ == pytest.approx(t1)
    again = det.score(model, images(6, 2), None, clean, seed=3)
    torch.testing.assert_close(a, again)
    # threshold = normal fit of clean entropies at FRR 1 %
    cs = det.clean_scores(model, clean, seed=3)
    h = -cs
    expected = -(h.mean() + h.std() * torch.distributions.Normal(0, 1).icdf(torch.tensor(0.01)))
    assert det.threshold(cs) == pytest.approx(float(expected), rel=1e-5)
    assert len(b) == 9


def test_flag_before_score_raises():
    with pytest.raises(ValueError, match="score"):
        detectors.create("strip").flag(torch.zeros(3))


@pytest.mark.parametrize("params", [{"n_overlays": 0}, {"alpha": 1.0}, {"frr": 0}, {"chunk_images": 0}])
def test_bad_hyperparameters(params):
    with pytest.raises(ValueError, match="must be"):
        detectors.create("strip", **params)
