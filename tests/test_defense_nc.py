"""Neural Cleanse: MAD anomaly index, batched trigger reverse engineering, mitigations.

The mechanism tests use a toy linear "network" on 8x8 images whose backdoor is known: class
``c`` is read from a band of rows, and one bright pixel at (7, 7) adds a large logit to class 0.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from backdoorlab import data, defenses
from backdoorlab.data.bundle import to_float
from backdoorlab.defenses import tools
from backdoorlab.defenses.nc import NeuralCleanse, anomaly_index, flag, squash, stamp, unsquash
from backdoorlab.train import predict

K = 4


class Toy(nn.Module):
    def __init__(self, backdoor: bool = True):
        super().__init__()
        self.linear = nn.Linear(64, K)
        w = torch.zeros(K, 8, 8)
        for c in range(K):
            w[c, 2 * c:2 * c + 2, :7] = 1.0
        if backdoor:
            w[0, 7, 7] = 40.0
        with torch.no_grad():
            self.linear.weight.copy_(w.flatten(1))
            self.linear.bias.zero_()

    def forward(self, x):
        return self.linear(x.flatten(1))


def toy_bundle(n: int = 64, seed: int = 0) -> data.TensorBundle:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    x = torch.randint(0, 20, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    for c in range(K):
        x[y == c, :, 2 * c:2 * c + 2, :7] = 255
    return data.TensorBundle("toy", x, y, x[:4].clone(), y[:4].clone(), K, (0.0,), (1.0,), crop_padding=0)


FAST = dict(re_epochs=30, re_batch_size=32)


@pytest.mark.parametrize("params, match", [
    (dict(re_epochs=0), r"re_epochs must be >= 1"),
    (dict(re_batch_size=1), r"re_batch_size must be >= 2"),
    (dict(cost_multiplier=1.0), r"cost_multiplier must be > 1"),
    (dict(attack_succ_threshold=1.5), r"attack_succ_threshold must be in \(0, 1\]"),
    (dict(threshold=0), r"threshold \(anomaly index\) must be > 0"),
    (dict(mitigation="retrain"), r"unknown mitigation 'retrain'; valid choices: unlearn, prune"),
    (dict(unlearn_ratio=0), r"unlearn_ratio must be in \(0, 1\]"),
    (dict(acc_ratio=1), r"acc_ratio must be in \[0, 1\)"),
    (dict(init_cost=-1e-3), r"init_cost must be >= 0"),
])
def test_bad_hyperparameters(params, match):
    with pytest.raises(ValueError, match=match):
        defenses.create("nc", **params)


def test_defaults_are_nc_and_backdoorbench():
    nc = defenses.create("nc")
    assert (nc.re_lr, nc.init_cost, nc.cost_multiplier, nc.patience, nc.attack_succ_threshold) == (0.1, 1e-3, 1.5, 5, 0.99)
    assert (nc.threshold, nc.mitigation, nc.unlearn_ratio) == (2.0, "unlearn", 0.2)
    assert "report" not in nc.params()


def test_anomaly_index_is_mad_based_and_flags_only_small_norms():
    norms = torch.tensor([1.0, 10.0, 11.0, 12.0, 9.0, 10.0, 40.0])
    median = 10.0
    mad = torch.tensor([9.0, 0.0, 1.0, 2.0, 1.0, 0.0, 30.0]).median()  # 1.0
    expected = (norms - median).abs() / (1.4826 * mad)
    assert torch.allclose(anomaly_index(norms), expected)
    assert flag(norms).tolist() == [0]  # 40 is an outlier too, but above the median
    assert anomaly_index(torch.tensor([1.0, 2.0, 3.0, 4.0]))[0] == pytest.approx(1.5 / (1.4826 * 1.0))  # np.median
    assert flag(torch.tensor([10.0, 11.0, 9.0, 10.5])).tolist() == []


def test_squash_round_trip_and_stamp():
    v = torch.rand(100) * 0.98 + 0.01
    assert torch.allclose(squash(unsquash(v)), v, atol=1e-5)
    assert squash(torch.tensor([-50.0, 50.0])).min() >= 0 and squash(torch.tensor([-50.0, 50.0])).max() <= 1
    x, m, p = torch.rand(2, 3, 4, 4), torch.zeros(1, 4, 4), torch.rand(3, 4, 4)
    m[0, 0, 0] = 1
    out = stamp(x, m, p)
    assert torch.equal(out[:, :, 0, 0], p[:, 0, 0].expand(2, 3)) and torch.equal(out[:, :, 1:], x[:, :, 1:])


def test_reverse_engineering_finds_the_planted_trigger():
    model, clean = Toy(), toy_bundle()
    nc = NeuralCleanse(**FAST)
    masks, patterns, stats = nc.reverse_engineer(model, clean, seed=0)
    assert masks.shape == (K, 1, 8, 8) and patterns.shape == (K, 1, 8, 8)
    assert masks.min() >= 0 and masks.max() <= 1 and patterns.min() >= 0 and patterns.max() <= 1
    assert all(stats["reached"])
    norms = masks.flatten(1).sum(1)
    assert norms.argmin() == 0 and norms[0] < 0.25 * norms[1:].min()
    assert masks[0, 0].flatten().argmax() == 63  # the backdoor pixel
    # the reversed trigger of class 0 sends every clean image to class 0
    assert (predict(model, stamp(to_float(clean.train_x), masks[0], patterns[0])) == 0).float().mean() >= 0.99


def test_prune_mitigation_removes_the_backdoor_feature():
    model, clean = Toy(), toy_bundle()
    before = model.linear.weight.clone()
    nc = NeuralCleanse(mitigation="prune", **FAST)
    purified = nc.purify(model, clean, progress=False)
    assert torch.equal(model.linear.weight, before)  # input untouched
    assert purified.state_dict().keys() == model.state_dict().keys()
    rep = nc.report
    assert rep["flagged"] == [0] and rep["mitigation"] == "prune"
    assert len(rep["norms"]) == K and len(rep["anomaly_index"]) == K and rep["anomaly_index"][0] > 2
    assert rep["pruned_channels"][0] == 63
    assert torch.all(purified.linear.weight[:, rep["pruned_channels"]] == 0)
    assert tools.accuracy(purified, clean) >= 0.9 * tools.accuracy(model, clean)
    triggered = to_float(clean.train_x).clone()
    triggered[:, :, 7, 7] = 1.0
    assert (predict(model, triggered) == 0).float().mean() == 1.0
    assert (predict(purified, triggered) == clean.train_y).float().mean() == 1.0


def test_unlearning_keeps_true_labels_on_stamped_samples():
    model, clean = Toy(), toy_bundle()
    nc = NeuralCleanse(epochs=3, lr=0.05, **FAST)
    purified = nc.purify(model, clean, scale="smoke", progress=False)
    assert nc.report["flagged"] == [0] and nc.report["mitigation"] == "unlearn"
    assert nc.report["unlearn_samples"] == round(0.2 * len(clean.train_y))
    assert purified.linear.weight[0, 63] < model.linear.weight[0, 63]  # the trigger's weight is unlearned
    assert model.linear.weight[0, 63] == 40.0


def test_no_flagged_class_returns_an_unchanged_clone():
    model, clean = Toy(backdoor=False), toy_bundle()
    nc = NeuralCleanse(**FAST)
    purified = nc.purify(model, clean, progress=False)
    assert nc.report["flagged"] == [] and nc.report["mitigation"] is None
    assert purified is not model
    assert all(torch.equal(a, b) for a, b in zip(purified.state_dict().values(), model.state_dict().values()))
