"""SSBA: a StegaStamp-style encoder trained by the package, cached in the zoo; the trigger
is the encoder's image-specific residual for one fixed secret."""
import pytest
import torch

from backdoorlab import attacks, paths
from backdoorlab.attacks import ssba as ssba_module
from backdoorlab.attacks.stegastamp import Decoder, Encoder


@pytest.fixture(scope="module")
def ssba(smoke_data):
    attack = attacks.create("ssba")
    attack.prepare(smoke_data, scale="smoke", seed=0)
    return attack


def test_encoder_learnt_to_hide_bits(ssba):
    stats = ssba._cache["stats"]
    assert stats["bit_accuracy"] > 0.6  # chance is 0.5
    assert 0 < stats["residual_rms"] < 0.3


def test_trigger_is_sample_specific(ssba, smoke_data):
    x = smoke_data.test_x[:16].float() / 255
    residual = ssba.apply(x) - x
    assert residual.abs().flatten(1).amax(1).min() > 0
    spread = (residual - residual.mean(0, keepdim=True)).pow(2).mean().sqrt()
    assert spread > 0.1 * residual.pow(2).mean().sqrt()  # not one pattern for all images


def test_secret_is_fixed_by_the_seed(ssba, smoke_data):
    secret = ssba._cache["secret"]
    assert secret.shape == (100,) and set(secret.unique().tolist()) == {0.0, 1.0}
    again = attacks.create("ssba")
    again.prepare(smoke_data, scale="smoke", seed=0)
    assert torch.equal(again._cache["secret"], secret)


def test_apply_needs_prepare():
    with pytest.raises(RuntimeError, match="call prepare"):
        attacks.create("ssba").apply(torch.zeros(1, 1, 28, 28))


def test_encoder_is_cached_in_the_zoo_and_shared_across_targets(ssba, smoke_data, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the encoder should come from the zoo")

    monkeypatch.setattr(ssba_module, "train_stegastamp", no_training)
    again = attacks.create("ssba", target=4)
    again.prepare(smoke_data, scale="smoke", seed=0)
    x = smoke_data.test_x[:4].float() / 255
    assert torch.equal(again.apply(x), ssba.apply(x))
    assert list(paths.zoo_dir().glob("ssba-encoder-mnist5k-s0-smoke-*"))


def test_networks_take_28_32_and_64_pixel_images():
    for channels, size in ((1, 28), (3, 32), (3, 64)):
        x = torch.rand(2, channels, size, size)
        residual = Encoder(channels, 100, 8)(x, torch.ones(2, 100))
        assert residual.shape == x.shape
        assert Decoder(channels, 100, 8)(x).shape == (2, 100)


def test_three_channel_images(monkeypatch, rgb_bundle):
    monkeypatch.setitem(ssba_module.ENCODER, "smoke", {"steps": 20, "lr": 1e-3, "batch": 8, "width": 4})
    data = rgb_bundle()
    attack = attacks.create("ssba", target=1, bits=16)
    attack.prepare(data, scale="smoke", seed=0)
    x = data.test_x[:4].float() / 255
    out = attack.apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
    with pytest.raises(ValueError, match="trained on images"):
        attack.apply(torch.zeros(1, 1, 28, 28))


@pytest.mark.parametrize("kwargs, match", [
    ({"bits": 0}, "bits must be an integer in 1..1024"),
    ({"residual_weight": -1}, r"residual_weight must be in \[0, 1000\]"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attacks.create("ssba", **kwargs)


def test_image_too_small():
    with pytest.raises(ValueError, match="at least 8x8"):
        attacks.create("ssba").validate(10, (1, 6, 6))
