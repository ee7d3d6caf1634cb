"""LIRA: bounded generator trigger, alternating updates, state saved with the model."""
import pytest
import torch
from torch import nn

from backdoorlab import attacks
from backdoorlab.data.bundle import TensorBundle


def tiny_bundle(channels=1, size=28, n=96):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % 10
    return TensorBundle("tiny", x, y, x[:40].clone(), y[:40].clone(), 10, (0.5,) * channels, (0.25,) * channels)


def test_apply_needs_prepare():
    with pytest.raises(RuntimeError, match="call prepare"):
        attacks.create("lira").apply(torch.rand(2, 1, 28, 28))


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_perturbation_is_bounded_by_eps_times_std(channels, size):
    data = tiny_bundle(channels, size)
    attack = attacks.create("lira", eps=0.05)
    attack.prepare(data, scale="smoke", seed=0)
    x = torch.rand(5, channels, size, size)
    out = attack.apply(x)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert (out - x).abs().max() <= 0.05 * 0.25 + 1e-6


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 28 * 28, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_generator_steps_in_its_phase_and_leaves_classifier_grads_alone():
    data = tiny_bundle()
    attack = attacks.create("lira", lr_atk=1e-2)
    attack.prepare(data, scale="smoke", seed=0)
    model = Net()
    attack.begin_training(model, data, type("R", (), {"epochs": 4})())  # smoke: 2 generator epochs
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    before = {k: v.clone() for k, v in attack._gen.state_dict().items()}
    frozen = attack.apply(x)
    loss, logits = attack.training_loss(model, x, y)
    assert logits.shape == (16, 10) and loss.ndim == 0
    assert all(p.grad is None for p in model.parameters())  # the generator step touched only G
    assert any(not torch.equal(before[k], v) for k, v in attack._gen.state_dict().items())
    assert torch.equal(attack.apply(x), frozen)  # the poisoning copy changes only at the epoch's end
    attack.end_epoch(0)
    assert not torch.equal(attack.apply(x), frozen)
    attack.end_epoch(1)  # generator phase over
    after = {k: v.clone() for k, v in attack._gen.state_dict().items()}
    attack.training_loss(model, x, y)
    assert all(torch.equal(after[k], v) for k, v in attack._gen.state_dict().items())


@pytest.mark.parametrize("kwargs, match", [
    ({"eps": 0}, r"eps must be in \(0, 1\]"),
    ({"alpha": 1.0}, r"alpha must be in \[0, 1\)"),
    ({"lr_atk": 0}, "lr_atk"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attacks.create("lira", **kwargs)


def test_validate_needs_16_pixels():
    with pytest.raises(ValueError, match="below 16x16"):
        attacks.create("lira").validate(10, (3, 8, 8))
