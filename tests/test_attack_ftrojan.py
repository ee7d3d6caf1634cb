"""FTrojan: +magnitude at fixed DCT frequencies of the U/V channels, blockwise."""
import pytest
import torch

from backdoorlab import attacks
from backdoorlab.attacks.frequency import (block_dct, block_idct, dct_matrix, frequency_poison, rgb_to_yuv,
                                           scaled_positions, yuv_to_rgb)


def test_dct_and_yuv_helpers_are_exact_inverses():
    d = dct_matrix(32, dtype=torch.float64)
    assert torch.allclose(d @ d.T, torch.eye(32, dtype=torch.float64), atol=1e-12)  # orthonormal
    x = torch.rand(3, 3, 64, 64, dtype=torch.float64)
    assert torch.allclose(block_idct(block_dct(x, 32), 32), x, atol=1e-12)
    assert torch.allclose(yuv_to_rgb(rgb_to_yuv(x)), x, atol=1e-12)
    c = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    c[0, 0, 0, 0] = 8.0  # the DC coefficient of a constant 8x8 block of ones
    assert torch.allclose(block_idct(c, 8), torch.ones(1, 1, 8, 8, dtype=torch.float64))
    assert torch.allclose(block_dct(x, 32)[:, :, :32, 32:], block_dct(x[:, :, :32, 32:], 32))  # blocks are independent


@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (4, 3, 64, 64), (4, 1, 28, 28)])
def test_apply_equals_the_literal_yuv_dct_pipeline(shape):
    attack = attacks.create("ftrojan", **attacks.params_for("ftrojan", shape[1:]))
    x = torch.rand(shape)
    expected = frequency_poison(x, attack.channels, attack.positions, attack.magnitude, attack.window)
    assert torch.allclose(attack.apply(x), expected, atol=1e-5)


def test_trigger_is_magnitude_at_the_positions_of_u_and_v_in_every_block():
    attack = attacks.create("ftrojan")
    for size, blocks in [(32, 1), (64, 2)]:
        x = torch.full((1, 3, size, size), 0.5)  # mid-grey: nothing is clamped
        diff = block_dct(rgb_to_yuv(attack.apply(x).double()) - rgb_to_yuv(x.double()), 32) * 255
        expected = torch.zeros_like(diff)
        for ch in (1, 2):
            for r, c in [(15, 15), (31, 31)]:
                expected[0, ch, r::32, c::32] = 30
        assert torch.allclose(diff, expected, atol=1e-3) and (expected == 30).sum() == 4 * blocks * blocks
        assert (attack.apply(x) - x).abs().max() * 255 < 8  # invisible: a few grey levels


def test_grayscale_variant_puts_the_trigger_in_the_luma_with_rescaled_positions():
    attack = attacks.create("ftrojan", channels=(0,))
    assert attacks.params_for("ftrojan", (1, 28, 28)) == {"channels": (0,)} and attacks.params_for("ftrojan", (3, 32, 32)) == {}
    assert scaled_positions(attack.positions, 32, 28) == [(13, 13), (27, 27)]
    x = torch.full((1, 1, 28, 28), 0.5)
    diff = block_dct((attack.apply(x) - x).double(), 28) * 255
    expected = torch.zeros_like(diff)
    expected[0, 0, 13, 13] = expected[0, 0, 27, 27] = 30
    assert torch.allclose(diff, expected, atol=1e-3)
    attack.validate(10, (1, 28, 28))


@pytest.mark.parametrize("name", ["ftrojan", "ctrl"])
def test_chroma_trigger_on_grayscale_data_is_refused_before_compute(name):
    """The default trigger lives in U and V: grayscale data has no colour, so it is an error naming the fix."""
    with pytest.raises(ValueError, match=r"need colour.*grayscale.*channels=\(0,\)"):
        attacks.create(name).validate(10, (1, 28, 28))
    with pytest.raises(ValueError, match="need colour"):
        attacks.create(name).apply(torch.rand(2, 1, 28, 28))


def test_ftrojan_is_dirty_label():
    attack = attacks.create("ftrojan", target=2)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    _, py = attack.poison_batch(x, y, torch.tensor([True, True, False, False]), 10)
    assert py.tolist() == [2, 2, 2, 3] and not attack.clean_label


@pytest.mark.parametrize("kwargs, match", [
    ({"channels": (3,)}, "channels must be distinct YUV channel indices from 0 .Y., 1 .U., 2 .V."),
    ({"channels": ()}, "channels must be distinct"),
    ({"channels": (1, 1)}, "channels must be distinct"),
    ({"positions": ((15, 32),)}, r"positions must be .* inside the 32x32 DCT window, i.e. in 0..31"),
    ({"positions": ((-1, 3),)}, r"in 0..31"),
    ({"positions": ()}, r"positions must be"),
    ({"magnitude": 0}, r"magnitude must be in \(0, 255\]"),
    ({"window": 1}, "window must be an integer >= 2"),
    ({"window": 8}, r"inside the 8x8 DCT window, i.e. in 0..7"),
])
def test_ftrojan_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attacks.create("ftrojan", **kwargs)


def test_lists_are_accepted_as_in_a_yaml_file():
    attack = attacks.create("ftrojan", channels=[1, 2], positions=[[15, 15], [31, 31]])
    assert attack.positions == ((15, 15), (31, 31)) and attack.channels == (1, 2)


def test_dataset_constraints_are_checked_before_compute():
    with pytest.raises(ValueError, match="image size 48x48 must be a multiple of the DCT window 32"):
        attacks.create("ftrojan").validate(10, (3, 48, 48))
    with pytest.raises(ValueError, match="needs RGB .3-channel. or grayscale .1-channel. images, got 4 channels"):
        attacks.create("ftrojan").validate(10, (4, 32, 32))
    attacks.create("ftrojan").validate(200, (3, 64, 64))
