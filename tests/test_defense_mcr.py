"""MCR: the Bezier curve, BN re-estimation and the defense's contract."""
import pytest
import torch

from backdoorlab import defenses
from backdoorlab.defenses.mcr import bezier, recompute_bn
from tiny import tiny_bundle as bundle, tiny_model as tiny


def test_bezier_hits_the_end_points_and_the_quadratic_midpoint():
    a, b, c = {"w": torch.zeros(3)}, {"w": torch.ones(3)}, {"w": torch.full((3,), 4.0)}
    assert torch.equal(bezier(0.0, a, b, c)["w"], a["w"])
    assert torch.equal(bezier(1.0, a, b, c)["w"], c["w"])
    assert torch.allclose(bezier(0.5, a, b, c)["w"], torch.full((3,), 0.25 * 0 + 0.5 * 1 + 0.25 * 4))


def test_recompute_bn_matches_the_clean_batch_statistics():
    model, b = tiny(), bundle()
    recompute_bn(model, b, batch_size=len(b.train_y), generator=torch.Generator().manual_seed(0))
    x = b.train_x.float() / 255
    first = model.conv1(model.normalize(x))
    bn = model.layer1[0].bn1
    assert torch.allclose(bn.running_mean, first.mean((0, 2, 3)), atol=1e-5)
    assert not model.training and bn.momentum == 0.1


def test_t0_returns_the_input_weights_and_the_input_is_untouched():
    model, b = tiny(), bundle()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = defenses.create("mcr", t=0.0, epochs=1, ft_epochs=1).purify(model, b, scale="smoke", progress=False)
    assert out is not model and out.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(p, q) for p, q in zip(out.parameters(), model.parameters()))


def test_an_inner_point_differs_from_both_ends():
    model, b = tiny(), bundle()
    inner = defenses.create("mcr", t=0.5, epochs=1, ft_epochs=1).purify(model, b, scale="smoke", progress=False)
    assert any(not torch.equal(p, q) for p, q in zip(inner.parameters(), model.parameters()))


@pytest.mark.parametrize("params,match", [({"t": 1.5}, r"\[0, 1\]"), ({"epochs": 0}, ">= 1"), ({"lr": 0}, "> 0"),
                                          ({"ft_lr": 0}, "> 0")])
def test_bad_hyperparameters(params, match):
    with pytest.raises(ValueError, match=match):
        defenses.create("mcr", **params)
