"""Refool: reflections (ghost or out-of-focus) of bundled photos, chosen per image by content."""
import pytest
import torch

from backdoorlab import attacks
from backdoorlab.attacks.refool import GAMMA


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(16, 3, 32, 32, generator=g) * 0.3  # dark: the blend never clamps


def test_ghost_model_is_a_linear_light_blend_with_one_reflection(images):
    attack = attacks.create("refool", ghost_rate=1.0, reflections=1)
    out = attack.apply(images)
    reflection = (out ** GAMMA - 0.4 * images ** GAMMA) / 0.6
    assert torch.allclose(reflection, reflection[:1].expand_as(reflection), atol=1e-4)  # the same layer for all
    assert reflection.std() > 0.05  # a real picture


def test_blur_model_weights_the_reflection_by_a_centred_vignette(images):
    attack = attacks.create("refool", ghost_rate=0.0, reflections=1, sigma=2.0)
    layer = (attack.apply(images) ** GAMMA - 0.4 * images ** GAMMA)[0]
    bank = attack.bank(3, 32, 32, images.device)
    assert bank["adjust"].item() > 1.08 and torch.allclose(layer, bank["layer"][0] * bank["weight"][0], atol=1e-5)
    assert bank["weight"].max() <= 0.8 + 1e-6 and bank["weight"][0, 0, 0, 0] < 0.05  # 1 - alpha_t / 2 at the centre


def test_reflection_depends_on_the_image_only_and_on_the_seed(images, smoke_data):
    attack = attacks.create("refool")
    chosen = attack.choose(images, attack.bank(3, 32, 32, images.device))
    assert len(set(chosen.tolist())) > 4  # images get different reflections
    perm = torch.randperm(16)
    assert torch.allclose(attack.apply(images[perm]), attack.apply(images)[perm])  # per image, not per position
    again = attacks.create("refool")
    again.prepare(smoke_data, seed=0)
    assert torch.equal(again.apply(images), attack.apply(images))
    other = attacks.create("refool")
    other.prepare(smoke_data, seed=1)
    assert not torch.allclose(other.apply(images), attack.apply(images))


def test_refool_works_on_grayscale_and_64px():
    attack = attacks.create("refool")
    for shape in [(4, 1, 28, 28), (4, 3, 64, 64)]:
        x = torch.rand(shape)
        out = attack.apply(x)
        assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1 and not torch.allclose(out, x)


def test_clean_label_option(mnist):
    assert not attacks.create("refool").clean_label
    attack = attacks.create("refool", clean_label=True, target=7)
    assert (mnist.train_y[attack.poison_indices(mnist.train_y, 0.05)] == 7).all()
    y = torch.tensor([1, 7])
    assert torch.equal(attack.poison_batch(torch.rand(2, 1, 28, 28), y, torch.ones(2, dtype=torch.bool), 10)[1], y)


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha_t": 1.0}, r"alpha_t must be in \(0, 1\)"),
    ({"alpha_t": -1}, r"alpha_t must be in \(0, 1\)"),
    ({"ghost_rate": 1.5}, r"ghost_rate must be in \[0, 1\]"),
    ({"offset": (3,)}, "offset must be two integers >= 0"),
    ({"offset": (-1, 2)}, "offset must be two integers >= 0"),
    ({"sigma": 0}, "sigma must be > 0"),
    ({"ghost_alpha": 1.5}, r"ghost_alpha must be in \[0, 1\] or negative"),
    ({"reflections": 0}, r"reflections must be an integer in 1..1024"),
    ({"clean_label": 1}, "clean_label must be True or False"),
])
def test_refool_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attacks.create("refool", **kwargs)


def test_refool_image_constraints():
    attacks.create("refool").validate(10, (1, 28, 28))
    with pytest.raises(ValueError, match="at least 16x16 and an offset inside the image"):
        attacks.create("refool", offset=(40, 3)).validate(10, (3, 32, 32))
    with pytest.raises(ValueError, match="got 2 channels"):
        attacks.create("refool").validate(10, (2, 32, 32))
