"""SIG: an additive horizontal sinusoid on target-class images, labels untouched."""
import math

import pytest
import torch

from backdoorlab import attacks


def test_sig_adds_the_sinusoid_along_the_width():
    attack = attacks.create("sig")
    assert attack.delta == 40 and attack.f == 6 and attack.clean_label
    for shape in [(2, 1, 28, 28), (2, 3, 32, 32), (2, 3, 64, 64)]:
        x = torch.full(shape, 0.5)
        out = attack.apply(x)
        m = shape[-1]
        j = torch.arange(m, dtype=torch.float64)
        expected = (40 / 255 * torch.sin(2 * math.pi * j * 6 / m)).float()
        assert torch.allclose(out - x, expected.expand(shape), atol=1e-6)  # same on every row and channel


def test_sig_clamps_to_the_unit_interval():
    out = attacks.create("sig", delta=255).apply(torch.cat([torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32)]))
    assert out.min() == 0 and out.max() == 1
    assert (out[0] > 0).any() and (out[1] < 1).any()


def test_sig_is_clean_label(mnist):
    attack = attacks.create("sig", target=3)
    idx = attack.poison_indices(mnist.train_y, 0.05, seed=0)
    assert (mnist.train_y[idx] == 3).all() and len(idx) == int(0.05 * len(mnist.train_y))
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
    px, py = attack.poison_batch(x, y, torch.ones(8, dtype=torch.bool), 10)
    assert torch.equal(py, y) and not torch.equal(px, x)  # trigger added, labels untouched
    with pytest.raises(ValueError, match="clean-label attack: only label_mode='all2one'"):
        attacks.create("sig", label_mode="all2all")


@pytest.mark.parametrize("kwargs, match", [
    ({"delta": 0}, r"delta must be in \(0, 255\]"),
    ({"delta": 300}, r"delta must be in \(0, 255\]"),
    ({"f": 0}, "f must be a number of periods > 0"),
    ({"f": "6"}, "f must be a number of periods > 0"),
])
def test_sig_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attacks.create("sig", **kwargs)


def test_sig_frequency_must_be_below_nyquist():
    attacks.create("sig", f=13).validate(10, (1, 28, 28))
    with pytest.raises(ValueError, match=r"f must be below half the image width \(the Nyquist limit, 14 periods"):
        attacks.create("sig", f=14).validate(10, (1, 28, 28))
