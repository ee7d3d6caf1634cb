import pytest
import torch
from torch import nn

from backdoorlab import attacks, data, metrics


def test_der_and_rir_follow_backdoorbench_simplified_definitions():
    before = {"acc": 0.92, "asr": 0.95, "ra": 0.05}
    after = {"acc": 0.90, "asr": 0.05, "ra": 0.85}
    assert metrics.der(before, after) == pytest.approx((0.90 - 0.02 + 1) / 2)  # the ACC drop is subtracted
    assert metrics.rir(before, after) == pytest.approx((0.80 - 0.02 + 1) / 2)
    assert metrics.der(before, before) == 0.5
    worse = {"acc": 0.95, "asr": 1.0, "ra": 0.0}  # higher ACC, higher ASR: no credit, no penalty
    assert metrics.der(before, worse) == 0.5


class Constant(nn.Module):
    def __init__(self, label, classes=10):
        super().__init__()
        self.label, self.classes = label, classes
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(len(x), self.classes)
        out[:, self.label] = 1
        return out + self.dummy


class Oracle(nn.Module):
    """Answers the true label of clean images and the target on triggered ones."""

    def __init__(self, bundle, attack):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.lookup = {bytes((x.float() / 255).numpy()): int(y) for x, y in zip(bundle.test_x, bundle.test_y)}
        self.attack = attack

    def forward(self, x):
        out = torch.zeros(len(x), 10)
        for i, img in enumerate(x):
            out[i, self.lookup.get(bytes(img.numpy()), self.attack.target)] = 1
        return out + self.dummy


def test_evaluate_on_constant_models():
    bundle = data.load("mnist5k").subset(test_limit=200)
    attack = attacks.create("badnets", target=0)
    zero = metrics.evaluate(Constant(0), bundle, attack)
    assert zero["asr"] == 1.0 and zero["ra"] == 0.0  # the poisoned test set excludes target-class images
    assert zero["acc"] == pytest.approx(float((bundle.test_y == 0).float().mean()))
    three = metrics.evaluate(Constant(3), bundle, attack)
    keep = bundle.test_y != 0
    assert three["asr"] == 0.0 and three["ra"] == pytest.approx(float((bundle.test_y[keep] == 3).float().mean()))
    assert metrics.evaluate(Constant(0), bundle) == {"acc": zero["acc"]}


def test_evaluate_on_an_oracle_backdoor():
    bundle = data.load("mnist5k").subset(test_limit=100)
    attack = attacks.create("badnets", target=2)
    result = metrics.evaluate(Oracle(bundle, attack), bundle, attack, batch_size=16)
    assert result == {"acc": 1.0, "asr": 1.0, "ra": 0.0}
