"""Blind backdoor: the pattern, untouched data, and the balanced loss."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backdoorlab import attacks
from backdoorlab.attacks.blind import PATTERN


def test_pattern_is_stamped_at_rows_3_7_cols_23_25():
    x = torch.full((2, 3, 32, 32), 0.5)
    out = attacks.create("blind").apply(x)
    changed = (out != x).any(1).any(0)
    assert torch.nonzero(changed).min(0).values.tolist() == [3, 23]
    assert torch.nonzero(changed).max(0).values.tolist() == [7, 25]
    expected = torch.tensor(PATTERN, dtype=torch.float32)
    patch = out[0, 0, 3:8, 23:26]
    assert torch.equal(torch.where(expected >= 0, expected, torch.tensor(0.5)), patch)
    assert (attacks.create("blind").apply(torch.zeros(1, 1, 28, 28)) != 0).sum() == 6  # 6 white pixels


def test_data_are_not_touched():
    attack = attacks.create("blind")
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    px, py = attack.training_batch(x, y, torch.ones(8, dtype=torch.bool), torch.arange(8), 10)
    assert px is x and py is y


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))


@pytest.mark.parametrize("threshold, on", [(100.0, True), (1e-6, False)])
def test_loss_is_normal_plus_weighted_backdoor_once_history_is_full(threshold, on):
    attack = attacks.create("blind", history=3, loss_threshold=threshold, backdoor_weight=0.9)
    attack.prepare(None, scale="smoke")
    model = make()
    attack.begin_training(model, type("D", (), {"device": torch.device("cpu")})(), None)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(1, 10, (16,))
    normal = F.cross_entropy(model(x), y)
    for _ in range(3):  # warm-up (history=3): the normal loss only
        loss, logits = attack.training_loss(model, x, y)
        assert torch.allclose(loss, normal) and torch.equal(logits, model(x))
    loss, _ = attack.training_loss(model, x, y)
    backdoor = F.cross_entropy(model(attack.apply(x)), torch.zeros_like(y))
    assert torch.allclose(loss, normal + 0.9 * backdoor if on else normal)


def test_history_per_scale():
    attack = attacks.create("blind")
    attack.prepare(None, scale="paper")
    assert attack._history == 1000


@pytest.mark.parametrize("kwargs, match", [
    ({"loss_balance": "MGDA"}, "loss_balance must be one of fixed"),
    ({"backdoor_weight": -1}, "backdoor_weight"),
    ({"history": -1}, "history must be None"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attacks.create("blind", **kwargs)


def test_validate_needs_room_for_the_pattern():
    attacks.create("blind").validate(10, (1, 28, 28))
    with pytest.raises(ValueError, match="does not fit a 16x16 image"):
        attacks.create("blind").validate(10, (3, 16, 16))
