"""EP (defenses/ep.py): entropy of standardised pre-activation maxima on the training set."""
from __future__ import annotations

import math

import pytest
import torch

from backdoorlab import attacks, defenses
from backdoorlab.defenses import ep, masking
from test_defense_masking import tiny_bundle, tiny_model


def test_histogram_entropy():
    n = 1000
    spread = torch.arange(n, dtype=torch.float32).unsqueeze(0)  # one value per bin
    assert torch.allclose(ep.histogram_entropy(spread, 1.0), torch.tensor([math.log(n)]), atol=1e-4)
    two = torch.tensor([[0.0] * 500 + [10.0] * 500])
    assert torch.allclose(ep.histogram_entropy(two, 1.0), torch.tensor([math.log(2)]), atol=1e-5)


def test_a_bimodal_channel_has_low_entropy_and_is_pruned():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(20, 256, generator=g)
    feats[7, :25] += 12  # 10% "poisoned" samples far out: after standardising the rest is compressed
    z = (feats - feats.mean(1, keepdim=True)) / feats.std(1, keepdim=True)
    scores = ep.histogram_entropy(z, 0.1)
    assert scores.argmin() == 7
    assert masking.outliers({"bn": scores}, 3, low=True)["bn"].nonzero().flatten().tolist() == [7]


@pytest.mark.parametrize("seed", [0, 3])
def test_purify_scores_a_sample_that_mixes_poisoned_and_clean_images(seed, monkeypatch):
    # BadNets of the same seed poisons 10% of 4000 samples: a random 256 hold ~26 (sd ~5). From the attack's own
    # random stream all 256 would be poisoned and there would be no second population to expose.
    bundle = tiny_bundle(4000)
    index = torch.arange(4000)
    bundle.train_x[:, 0, 0, 0], bundle.train_x[:, 0, 0, 1] = (index // 256).to(torch.uint8), (index % 256).to(torch.uint8)
    scored, original = [], ep.entropy_scores

    def recording(model, x, bin_width):  # which training images purify scores, decoded from their first pixels
        scored.append(x[:, 0, 0, 0].long() * 256 + x[:, 0, 0, 1].long())
        return original(model, x, bin_width)

    monkeypatch.setattr(ep, "entropy_scores", recording)
    defenses.create("ep").purify(tiny_model(), bundle, seed=seed)
    poisoned = attacks.create("badnets").poison_indices(bundle.train_y, 0.1, seed=seed)
    assert len(scored) == 1 and len(scored[0].unique()) == 256
    assert 10 <= int(torch.isin(scored[0], poisoned).sum()) <= 50


def test_purify_copies_prunes_and_declares_its_data():
    model, bundle = tiny_model(), tiny_bundle(40)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = defenses.create("ep", u=0.5, samples=32)
    purified = method.purify(model, bundle)
    assert type(method).data_source == "poisoned_training_set"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert purified.state_dict().keys() == model.state_dict().keys()
    zeroed = sum(int(((bn.weight == 0) & (bn.bias == 0)).sum()) for bn in masking.bn_layers(purified).values())
    assert zeroed == method.selection["pruned"] > 0


@pytest.mark.parametrize("params, match", [({"u": -1}, r"u must be in \[0, inf\]"),
                                           ({"bin_width": 0}, r"bin_width must be in \(0, inf\]"),
                                           ({"samples": 1}, "samples must be >= 2")])
def test_bad_hyperparameters_raise(params, match):
    with pytest.raises(ValueError, match=match):
        defenses.create("ep", **params)
