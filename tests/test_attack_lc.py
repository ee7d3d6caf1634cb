"""LC (label-consistent): checkerboard trigger, batched PGD crafting cached in the zoo,
training batches that swap in the crafted images."""
import pytest
import torch

from backdoorlab import attacks, paths
from backdoorlab.attacks import lc as lc_module


@pytest.fixture(scope="module")
def lc(smoke_data):
    attack = attacks.create("lc")
    attack.prepare(smoke_data, scale="smoke", seed=0)
    return attack


def test_trigger_is_a_checkerboard_in_the_four_corners():
    out = attacks.create("lc").apply(torch.full((2, 3, 32, 32), 0.5))
    board = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    for rows in (slice(0, 3), slice(29, 32)):
        for cols in (slice(0, 3), slice(29, 32)):
            assert torch.equal(out[:, :, rows, cols], board.expand(2, 3, 3, 3))
    inner = out[:, :, 3:29, 3:29]
    assert (inner == 0.5).all() and (out != 0.5).sum() == 2 * 3 * 4 * 9
    one = attacks.create("lc", corners=1).apply(torch.full((1, 1, 28, 28), 0.5))
    assert (one != 0.5).sum() == 9 and (one[..., 25:, 25:] != 0.5).sum() == 9


def test_reduced_amplitude_blends_towards_the_pattern():
    x = torch.full((1, 1, 32, 32), 0.5)
    out = attacks.create("lc", reduced_amplitude=0.5).apply(x)
    assert out[0, 0, 31, 31] == 0.75 and out[0, 0, 31, 30] == 0.25


def test_crafted_images_are_the_target_class_within_eps(lc, smoke_data):
    slot, adv = lc._cache["slot"], lc._cache["adversarial"]
    index = torch.nonzero(slot >= 0).squeeze(1)
    assert torch.equal(index, torch.nonzero(smoke_data.train_y == 0).squeeze(1))
    assert adv.dtype == torch.uint8 and adv.shape == (len(index), 1, 28, 28)
    diff = (adv.float() - smoke_data.train_x[index].float()).abs()
    assert diff.max() <= 8 and diff.max() > 0  # eps 8/255, and PGD moved something


def test_training_batch_swaps_in_the_crafted_image_then_the_trigger(lc, smoke_data):
    idx = torch.arange(40)
    x, y = smoke_data.train_x[idx].float() / 255, smoke_data.train_y[idx]
    mask = y == 0
    mask[torch.nonzero(mask)[0]] = False  # one target-class sample left clean
    px, py = lc.training_batch(x, y, mask, idx, 10)
    assert torch.equal(py, y)  # clean-label: labels untouched
    assert torch.equal(px[~mask], x[~mask])
    crafted = lc._cache["adversarial"][lc._cache["slot"][idx[mask]]].float() / 255
    assert torch.allclose(px[mask], lc.apply(crafted))
    assert not torch.allclose(px[mask], lc.apply(x[mask]))


def test_training_needs_prepare():
    with pytest.raises(RuntimeError, match="call prepare"):
        attacks.create("lc").begin_training(None, None, None)
    with pytest.raises(RuntimeError, match="call prepare"):
        attacks.create("lc").training_batch(torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long),
                                            torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.long), 10)


def test_crafting_is_cached_in_the_zoo(lc, smoke_data, monkeypatch):
    def no_crafting(*args, **kwargs):
        raise AssertionError("the crafted images should come from the zoo")

    monkeypatch.setattr(lc_module, "craft_pgd", no_crafting)
    again = attacks.create("lc")
    again.prepare(smoke_data, scale="smoke", seed=0)
    assert torch.equal(again._cache["adversarial"], lc._cache["adversarial"])
    assert list(paths.zoo_dir().glob("lc-adv-mnist5k-s0-smoke-*"))


def test_three_channel_images(rgb_bundle):
    data = rgb_bundle()
    attack = attacks.create("lc", target=1)
    attack.prepare(data, scale="smoke", seed=0)
    assert attack._cache["adversarial"].shape == (24, 3, 32, 32)
    x = data.train_x[:8].float() / 255
    px, _ = attack.training_batch(x, data.train_y[:8], data.train_y[:8] == 1, torch.arange(8), 4)
    assert px.shape == x.shape and px.min() >= 0 and px.max() <= 1


@pytest.mark.parametrize("kwargs, match", [
    ({"eps": 2.0}, r"eps must be in \[0, 1\]"),
    ({"step_size": 0}, r"step_size must be in \(0, 1\]"),
    ({"reduced_amplitude": 0}, r"reduced_amplitude must be in \(0, 1\]"),
    ({"patch_size": 0}, "patch_size must be an integer in 1..32"),
    ({"corners": 2}, "corners must be one of 1, 4"),
    ({"label_mode": "all2all"}, "clean-label attack"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attacks.create("lc", **kwargs)


def test_patch_too_large_for_the_image():
    with pytest.raises(ValueError, match="does not fit a 28x28 image"):
        attacks.create("lc", patch_size=20).validate(10, (1, 28, 28))
    attacks.create("lc", patch_size=20, corners=1).validate(10, (1, 28, 28))
