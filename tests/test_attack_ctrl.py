"""CTRL: a whole-image YUV/DCT trigger, clean-label by default."""
import pytest
import torch

from backdoorlab import attacks
from backdoorlab.attacks.frequency import block_dct, frequency_poison, rgb_to_yuv


def test_ctrl_defaults_are_backdoorbench_s():
    attack = attacks.create("ctrl")
    assert attack.clean_label and attack.use_clean_label
    assert (attack.channels, attack.positions, attack.magnitude, attack.window) == ((1, 2), (15, 31), 100, None)


@pytest.mark.parametrize("size", [32, 64])
def test_trigger_sits_on_the_diagonal_frequencies_of_the_whole_image(size):
    attack = attacks.create("ctrl")
    x = torch.full((2, 3, size, size), 0.5)
    diff = block_dct(rgb_to_yuv(attack.apply(x).double()) - rgb_to_yuv(x.double()), size) * 255
    expected = torch.zeros_like(diff)
    expected[:, 1:, 15, 15] = expected[:, 1:, 31, 31] = 100  # one block: positions 15, 31 as in BackdoorBench
    assert torch.allclose(diff, expected, atol=1e-3)


def test_apply_equals_the_literal_pipeline_on_grayscale_and_colour():
    for shape, channels in [((4, 1, 28, 28), (0,)), ((4, 3, 32, 32), (1, 2))]:
        attack = attacks.create("ctrl", **attacks.params_for("ctrl", shape[1:]))
        x = torch.rand(shape)
        assert torch.allclose(attack.apply(x), frequency_poison(x, channels, (15, 31), 100, None), atol=1e-5)


def test_clean_label_switch(mnist):
    clean = attacks.create("ctrl", target=5)
    idx = clean.poison_indices(mnist.train_y, 0.05, seed=0)
    assert (mnist.train_y[idx] == 5).all()
    y = torch.tensor([1, 5])
    assert torch.equal(clean.poison_batch(torch.rand(2, 3, 28, 28), y, torch.ones(2, dtype=torch.bool), 10)[1], y)
    dirty = attacks.create("ctrl", target=5, use_clean_label=False)
    assert not dirty.clean_label and attacks.create("ctrl").clean_label  # the instance, not the class, switched
    assert dirty.poison_batch(torch.rand(2, 3, 28, 28), y, torch.ones(2, dtype=torch.bool), 10)[1].tolist() == [5, 5]
    assert len(set(mnist.train_y[dirty.poison_indices(mnist.train_y, 0.05, seed=0)].tolist())) == 10
    attacks.create("ctrl", use_clean_label=False, label_mode="all2all")
    with pytest.raises(ValueError, match="clean-label attack: only label_mode='all2one'"):
        attacks.create("ctrl", label_mode="all2all")


@pytest.mark.parametrize("kwargs, match", [
    ({"use_clean_label": "yes"}, "use_clean_label must be True or False"),
    ({"positions": (15, 32)}, r"inside the 32x32 DCT window, i.e. in 0..31"),
    ({"magnitude": 256}, r"magnitude must be in \(0, 255\]"),
    ({"channels": (0, 5)}, "channels must be distinct YUV channel indices"),
])
def test_ctrl_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attacks.create("ctrl", **kwargs)


def test_ctrl_window_must_tile_the_image():
    attacks.create("ctrl").validate(10, (3, 48, 48))  # the whole image is the window
    with pytest.raises(ValueError, match="image size 48x48 must be a multiple of the DCT window 32"):
        attacks.create("ctrl", window=32).validate(10, (3, 48, 48))
