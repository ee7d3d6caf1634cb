"""Input-aware: mask pre-training, poisoned/cross batches, deferred generator steps,
generators saved with the model."""
import pytest
import torch
from torch import nn

from backdoorlab import attacks
from backdoorlab.attacks.inputaware import threshold
from backdoorlab.data.bundle import TensorBundle


def tiny_bundle(channels=1, size=28, n=96):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % 10
    return TensorBundle("tiny", x, y, x[:40].clone(), y[:40].clone(), 10, (0.5,) * channels, (0.25,) * channels)


@pytest.fixture(autouse=True)
def fresh_zoo(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKDOORLAB_RUNS", str(tmp_path))


def test_apply_needs_prepare():
    with pytest.raises(RuntimeError, match="call prepare"):
        attacks.create("inputaware").apply(torch.rand(2, 1, 28, 28))


@pytest.mark.parametrize("channels, size, base, steps", [(1, 28, 16, 2), (3, 32, 32, 3)])
def test_generators_fit_both_image_kinds(channels, size, base, steps):
    data = tiny_bundle(channels, size)
    attack = attacks.create("inputaware", mask_epochs=1)
    attack.prepare(data, scale="smoke", seed=0)
    assert attack.architecture(channels, size, size) == (base, steps)
    x = torch.rand(4, channels, size, size)
    out = attack.apply(x)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1


@pytest.mark.calibrated  # 8 epochs on 256 digits: the density bar was measured with 2 threads
def test_mask_pretraining_makes_sparse_diverse_masks_and_is_cached(mnist):
    data = mnist.subset(torch.arange(256), 64)
    trained = attacks.create("inputaware", mask_epochs=8)
    trained.prepare(data, scale="smoke", seed=0)
    x = data.train_x[:64].float() / 255
    with torch.no_grad():
        masks = threshold(trained._m(x))
    assert 0.005 < masks.mean() < 0.1  # near mask_density 0.032
    assert (masks[:32] - masks[32:]).abs().mean() > 0.01  # different images, different masks
    again = attacks.create("inputaware", mask_epochs=8)
    again.prepare(data, scale="smoke", seed=0)  # loaded from the zoo cache
    assert all(torch.equal(a, b) for a, b in zip(trained._m.state_dict().values(), again._m.state_dict().values()))


def test_batch_roles_and_deferred_generator_step():
    data = tiny_bundle()
    attack = attacks.create("inputaware", mask_epochs=0)
    attack.prepare(data, scale="smoke", seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    attack.begin_training(model, data, None)
    x, y = torch.rand(20, 1, 28, 28), torch.randint(1, 10, (20,))
    mask = torch.zeros(20, dtype=torch.bool)
    mask[:3] = True
    px, py = attack.training_batch(x, y, mask, torch.arange(20), 10)
    poisoned, cross, other = attack._roles
    assert torch.equal(px, x) and (py[:3] == 0).all() and torch.equal(py[3:], y[3:])
    assert int(cross.sum()) == 3 and not (cross & mask).any() and (other != torch.arange(20)).all()
    before = [p.clone() for p in attack._g.parameters()]
    loss, logits = attack.training_loss(model, px, py)
    loss.backward()  # what train.fit does: fills the classifier's and G's gradients
    assert all(p.grad is not None for p in attack._g.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, attack._g.parameters()))
    attack.end_epoch(0)  # G's optimizer steps
    assert any(not torch.equal(a, b) for a, b in zip(before, attack._g.parameters()))
    assert all(p.grad is None for p in attack._g.parameters())


@pytest.mark.parametrize("kwargs, match", [
    ({"lr_g": 0}, r"lr_g must be in \(0, 1\]"),
    ({"mask_density": 1.5}, r"mask_density must be in \(0, 1\)"),
    ({"mask_epochs": -1}, "mask_epochs must be None"),
    ({"cross_ratio": -1}, "cross_ratio"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attacks.create("inputaware", **kwargs)
