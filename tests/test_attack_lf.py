"""LF (low frequency): a smooth, L-inf bounded universal pattern fitted against a clean
surrogate, cached in the zoo."""
import pytest
import torch

from backdoorlab import attacks, paths
from backdoorlab.attacks import lf as lf_module
from backdoorlab.attacks.surrogate import clean_surrogate


@pytest.fixture(scope="module")
def lf(smoke_data):
    attack = attacks.create("lf")
    attack.prepare(smoke_data, scale="smoke", seed=0)
    return attack


def dct_matrix(n):
    k, i = torch.arange(n)[:, None].float(), torch.arange(n)[None, :].float()
    m = torch.cos(torch.pi * (2 * i + 1) * k / (2 * n)) * (2 / n) ** 0.5
    m[0] /= 2 ** 0.5
    return m


def high_frequency_share(v):
    """Fraction of the (2-D DCT) energy outside the lowest eighth of frequencies per axis."""
    h, w = v.shape[-2:]
    coef = dct_matrix(h) @ (v - v.mean()) @ dct_matrix(w).T
    energy = coef ** 2
    return float(1 - energy[..., : h // 8, : w // 8].sum() / energy.sum())


def test_pattern_is_bounded_smooth_and_universal(lf):
    v = lf._cache["pattern"]
    assert v.shape == (1, 28, 28) and 0 < v.abs().max() <= 0.1 + 1e-6
    assert high_frequency_share(v) < 0.02
    assert high_frequency_share(torch.rand(1, 28, 28)) > 0.5  # the measure does see noise
    x = torch.full((3, 1, 28, 28), 0.5)
    out = lf.apply(x)
    assert torch.allclose(out - x, v.expand(3, -1, -1, -1), atol=1e-6)  # same pattern, additive


def test_pattern_pushes_the_surrogate_towards_the_target(lf, smoke_data):
    model = clean_surrogate(smoke_data, scale="smoke", seed=0)
    keep = smoke_data.test_y != 0
    x = smoke_data.test_x[keep].float() / 255
    with torch.no_grad():
        before = model(x).softmax(1)[:, 0].mean()
        after = model(lf.apply(x)).softmax(1)[:, 0].mean()
    assert after > before


def test_apply_needs_prepare():
    with pytest.raises(RuntimeError, match="call prepare"):
        attacks.create("lf").apply(torch.zeros(1, 1, 28, 28))


def test_pattern_is_cached_in_the_zoo(lf, smoke_data, monkeypatch):
    def no_fitting(*args, **kwargs):
        raise AssertionError("the pattern should come from the zoo")

    monkeypatch.setattr(lf_module.LF, "_fit", no_fitting)
    again = attacks.create("lf")
    again.prepare(smoke_data, scale="smoke", seed=0)
    assert torch.equal(again._cache["pattern"], lf._cache["pattern"])
    assert list(paths.zoo_dir().glob("lf-pattern-mnist5k-s0-smoke-*"))


def test_other_target_other_pattern(lf, smoke_data):
    other = attacks.create("lf", target=3)
    other.prepare(smoke_data, scale="smoke", seed=0)
    assert not torch.allclose(other._cache["pattern"], lf._cache["pattern"])


def test_three_channel_images_and_shape_check(rgb_bundle):
    data = rgb_bundle()
    attack = attacks.create("lf", target=1)
    attack.prepare(data, scale="smoke", seed=0)
    v = attack._cache["pattern"]
    assert v.shape == (3, 32, 32) and v.abs().max() <= 0.1 + 1e-6 and high_frequency_share(v) < 0.02
    with pytest.raises(ValueError, match="prepared for images"):
        attack.apply(torch.zeros(1, 1, 28, 28))


def test_lowpass_keeps_constants_and_removes_checkerboards():
    k = lf_module.lowpass_kernel(6.0, 32, 32)
    assert torch.allclose(lf_module.lowpass(torch.ones(1, 2, 32, 32), k), torch.ones(1, 2, 32, 32), atol=1e-5)
    board = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2).float()[None, None] * 2 - 1
    assert lf_module.lowpass(board, k).abs().max() < 0.05


@pytest.mark.parametrize("kwargs, match", [
    ({"eps": 0}, r"eps must be in \(0, 1\]"),
    ({"sigma": 40}, r"sigma must be in \(0, 32\]"),
    ({"images": 0}, "images must be an integer >= 1"),
    ({"step_size": 2}, r"step_size must be in \(0, 1\]"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attacks.create("lf", **kwargs)


def test_image_too_small():
    with pytest.raises(ValueError, match="at least 4x4"):
        attacks.create("lf").validate(10, (1, 3, 3))
