"""Poison Ink: coloured edges of the image itself, embedded as a faint residual."""
import pytest
import torch

from backdoorlab import attacks
from backdoorlab.attacks.poison_ink import canny_edges, luma


def square(channels=1, size=32, lo=8, hi=24):
    x = torch.zeros(1, channels, size, size)
    x[..., lo:hi, lo:hi] = 1.0
    return x


def test_edges_trace_the_outline_of_a_square():
    e = canny_edges(square(), threshold=0.2)[0, 0]
    assert e[:4].sum() == 0 and e[:, :4].sum() == 0  # far outside: nothing
    assert e[12:20, 12:20].sum() == 0  # deep inside: nothing
    for side in (e[6:10, 12:20], e[22:26, 12:20], e[12:20, 6:10], e[12:20, 22:26]):
        assert (side.sum(0 if side.shape[0] < side.shape[1] else 1) >= 1).all()  # every side is traced
    assert e.sum() < 0.25 * e.numel()  # thin edges, not a blob


def test_ink_colours_only_the_edges_towards_the_trigger_colour():
    attack = attacks.create("poison_ink", color=(0.0, 1.0, 0.0), strength=0.5)
    x = square(3) * 0.5 + 0.25
    out = attack.apply(x)
    e = attack.edges(x)
    assert e.sum() > 0
    assert torch.equal(out * (1 - e), x * (1 - e))  # nothing off the edges changes
    delta = (out - x)[0, :, e[0, 0] > 0]
    assert (delta[1] > 0).all() and (delta[0] < 0).all() and (delta[2] < 0).all()  # towards green
    expected = x + 0.5 * e * (torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1) - x)
    assert torch.allclose(out, expected)


def test_one_channel_ink_is_the_luma_of_the_colour():
    attack = attacks.create("poison_ink", color=(1.0, 0.0, 1.0), strength=1.0)
    x = square(1) * 0.9
    out = attack.apply(x)
    e = attack.edges(x)[0, 0] > 0
    assert torch.allclose(out[0, 0][e], torch.full((int(e.sum()),), 0.299 + 0.114))


def test_strength_bounds_the_change_and_output_stays_in_range():
    x = torch.rand(8, 3, 32, 32)
    for s in (0.05, 0.2, 1.0):
        out = attacks.create("poison_ink", strength=s).apply(x)
        assert (out - x).abs().max() <= s + 1e-6 and out.min() >= 0 and out.max() <= 1


def test_image_without_edges_is_unchanged():
    x = torch.full((2, 3, 32, 32), 0.4)
    assert torch.equal(attacks.create("poison_ink").apply(x), x)


def test_trigger_follows_the_content():
    """Shifting the image shifts the trigger (the edge map is translation-equivariant)."""
    attack = attacks.create("poison_ink")
    x = square(1, lo=6, hi=18)
    shifted = torch.roll(x, (5, 7), dims=(2, 3))
    assert torch.equal(torch.roll(attack.edges(x), (5, 7), dims=(2, 3)), attack.edges(shifted))


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_batch_equals_single_images_bit_for_bit(shape):
    attack = attacks.create("poison_ink")
    x = torch.rand(6, *shape)
    x[:3] = (x[:3] * 255).round() / 255  # quantised like real data: ties in non-maximum suppression
    whole = attack.apply(x)
    assert torch.equal(whole, torch.cat([attack.apply(x[i:i + 1]) for i in range(6)]))
    assert whole.shape == x.shape


def test_edges_of_mnist_digits(mnist):
    x = mnist.train_x[:32].float() / 255
    e = attacks.create("poison_ink").edges(x)
    frac = e.flatten(1).mean(1)
    assert (frac > 0.02).all() and (frac < 0.4).all()
    assert torch.equal(luma(x), x)


def test_parameters_in_repr_and_list_colour_accepted():
    attack = attacks.create("poison_ink", color=[1, 0, 0])
    assert attack.color == (1.0, 0.0, 0.0)
    assert "color=(1.0, 0.0, 0.0)" in repr(attack) and "strength=" in repr(attack)


@pytest.mark.parametrize("kwargs, match", [
    ({"color": (1.0, 0.0)}, r"color must be an \(R, G, B\) triple"),
    ({"color": "red"}, r"color must be an \(R, G, B\) triple"),
    ({"color": (1.5, 0.0, 0.0)}, r"color values must be in \[0, 1\]"),
    ({"strength": 0.0}, r"strength must be in \(0, 1\]"),
    ({"strength": 1.5}, r"strength must be in \(0, 1\]"),
    ({"threshold": 0}, r"threshold must be in \(0, 1\]"),
    ({"blur": "yes"}, "blur must be True or False"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attacks.create("poison_ink", **kwargs)


def test_dataset_constraints():
    attack = attacks.create("poison_ink")
    attack.validate(10, (1, 28, 28))
    attack.validate(10, (3, 32, 32))
    with pytest.raises(ValueError, match="1- or 3-channel"):
        attack.validate(10, (4, 32, 32))
    with pytest.raises(ValueError, match="at least 3x3"):
        attack.validate(10, (3, 2, 2))
