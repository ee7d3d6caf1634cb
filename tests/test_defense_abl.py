"""ABL: the LGA loss, lowest-loss isolation, the four fit phases, hyperparameter checks."""
from __future__ import annotations

import pytest
import torch

from backdoorlab import defenses, models
from backdoorlab.data.bundle import TensorBundle
from backdoorlab.defenses.abl import ascent_loss, lga_loss, per_sample_loss


def tiny_bundle(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 12, 12), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorBundle("tiny", x, y, x[:8], y[:8], 10, (0.5,), (0.5,), crop_padding=2)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return models.create("preactresnet18", 10, 1, width=4)


def test_lga_loss_sign_flips_at_gamma():
    model = tiny_model()
    x = torch.rand(8, 1, 12, 12)
    y = torch.zeros(8, dtype=torch.long)
    ce = torch.nn.functional.cross_entropy(model(x), y).detach()
    low, _ = lga_loss(float(ce) + 1)(model, x, y)  # CE below gamma: ascent
    low, high_ = low.detach(), None
    high = lga_loss(float(ce) - 1)(model, x, y)[0].detach()
    assert float(low) == pytest.approx(-float(ce), rel=1e-5)
    assert float(high) == pytest.approx(float(ce), rel=1e-5)
    neg = ascent_loss(model, x, y)[0].detach()
    assert float(neg) == pytest.approx(-float(ce), rel=1e-5)


def test_isolation_picks_the_lowest_losses():
    model, data = tiny_model(), tiny_bundle(200)
    abl = defenses.create("abl", isolation_ratio=0.05)
    iso = abl.isolate(model, data)
    losses = per_sample_loss(model, data)
    assert len(iso) == 10
    rest = torch.ones(200, dtype=torch.bool)
    rest[iso] = False
    assert losses[iso].max() <= losses[rest].min()


def test_train_runs_all_phases_and_keeps_architecture():
    model, data = tiny_model(), tiny_bundle()
    keys = set(model.state_dict())
    abl = defenses.create("abl", tuning_epochs=1, finetuning_epochs=1, unlearning_epochs=1, batch_size=16)
    assert abl.kind == "training" and abl.epochs("smoke") == (1, 1, 1)
    out = abl.train(model, data, scale="smoke", progress=False)
    assert set(out.state_dict()) == keys
    assert abl.isolated_ is not None and len(abl.isolated_) == 2  # max(2, 1 % of 64)
    assert all(torch.isfinite(p).all() for p in out.parameters())


def test_default_epochs_follow_the_scale():
    abl = defenses.create("abl")
    assert abl.epochs("paper") == (20, 60, 20)
    assert abl.epochs("smoke") == (3, 2, 20)


def test_purify_is_refused():
    with pytest.raises(TypeError, match="training-time"):
        defenses.create("abl").purify(tiny_model(), tiny_bundle())


@pytest.mark.parametrize("params", [{"isolation_ratio": 0}, {"isolation_ratio": 1}, {"gamma": -1},
                                    {"tuning_epochs": 0}, {"lr_unlearning": 0}, {"weight_decay": -1}])
def test_bad_hyperparameters(params):
    with pytest.raises(ValueError, match="must be"):
        defenses.create("abl", **params)
