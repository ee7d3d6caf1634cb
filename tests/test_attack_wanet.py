"""WaNet: the warping kernel, noise-mode batches and the saved warp field."""
import pytest
import torch

from backdoorlab import attacks
from backdoorlab.attacks.wanet import identity_grid, warp


def prepared(**params):
    attack = attacks.create("wanet", **params)
    attack.prepare(None, seed=0)
    return attack


def test_identity_grid_is_the_identity_warp():
    x = torch.rand(4, 3, 32, 32)
    assert torch.allclose(warp(x, identity_grid(32, 32).expand(4, -1, -1, -1)), x, atol=1e-5)
    assert torch.allclose(prepared(s=0.0).apply(x), x, atol=1e-5)  # s = 0: no warp at all


def test_warp_is_small_smooth_and_fixed_by_the_seed():
    x = torch.rand(2, 1, 28, 28)
    a, b = prepared(), prepared()
    assert torch.equal(a.apply(x), b.apply(x))
    other = attacks.create("wanet")
    other.prepare(None, seed=1)
    assert not torch.equal(a.apply(x), other.apply(x))
    # the displacement is a fraction of a pixel (s / H in grid units at most ~ s * max|field| / 2 pixels)
    shift = (a.grid(28, 28, torch.device("cpu")) - identity_grid(28, 28)).abs().amax() * 27 / 2
    assert 0 < shift < 1.5
    assert a.state_tensors()["field"].abs().mean() == pytest.approx(1.0, rel=1e-5)


def test_training_batch_poisons_masked_and_adds_noise_mode_samples():
    attack = prepared()
    attack.begin_training(None, type("D", (), {"device": torch.device("cpu")})(), None)
    x, y = torch.rand(32, 3, 32, 32), torch.randint(1, 10, (32,))
    mask = torch.zeros(32, dtype=torch.bool)
    mask[:4] = True
    px, py = attack.training_batch(x, y, mask, torch.arange(32), 10)
    assert torch.allclose(px[:4], attack.apply(x[:4])) and (py[:4] == 0).all()
    changed = (px != x).flatten(1).any(1)
    assert int(changed[4:].sum()) == 2 * 4  # cross_ratio 2: twice as many noise-mode samples
    assert torch.equal(py[4:], y[4:])  # noise-mode samples keep their true labels
    noise_mode = torch.nonzero(changed[4:]).squeeze(1) + 4
    assert not torch.allclose(px[noise_mode], attack.apply(x[noise_mode]))  # grid + random noise
    none = attacks.create("wanet", cross_ratio=0)
    none.prepare(None, seed=0)
    none.begin_training(None, type("D", (), {"device": torch.device("cpu")})(), None)
    px, _ = none.training_batch(x, y, mask, torch.arange(32), 10)
    assert torch.equal(px[4:], x[4:])


def test_field_survives_state_round_trip():
    a = prepared()
    b = attacks.create("wanet")
    b.load_state_tensors(a.state_tensors())
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(a.apply(x), b.apply(x))
    with pytest.raises(ValueError, match="field"):
        attacks.create("wanet", k=8).load_state_tensors(a.state_tensors())


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 1}, "k .*must be an integer >= 2"),
    ({"s": -1.0}, r"s \(warping strength\) must be in"),
    ({"cross_ratio": -1}, "cross_ratio"),
    ({"grid_rescale": 0}, "grid_rescale"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attacks.create("wanet", **kwargs)


def test_validate_checks_the_image_size():
    with pytest.raises(ValueError, match="k=40 is larger than the image"):
        attacks.create("wanet", k=40).validate(10, (1, 28, 28))
