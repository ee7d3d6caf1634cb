"""SAU: shared adversarial examples, the unlearning loss and the defense's contract."""
import pytest
import torch

from backdoorlab import defenses
from backdoorlab.defenses.sau import js_divergence, shared_adversarial_examples, shared_unlearning_loss
from tiny import tiny_bundle as bundle, tiny_model as tiny


def test_js_divergence_is_symmetric_zero_on_equal_and_bounded():
    p, q = torch.softmax(torch.randn(5, 4), 1), torch.softmax(torch.randn(5, 4), 1)
    assert torch.allclose(js_divergence(p, q), js_divergence(q, p))
    assert torch.allclose(js_divergence(p, p), torch.zeros(5), atol=1e-6)
    assert (js_divergence(p, q) <= torch.log(torch.tensor(2.0)) + 1e-6).all()


def test_shared_examples_stay_in_the_linf_ball_at_the_corners():
    model, ref = tiny(0), tiny(1)
    b = bundle(8)
    x, y = b.train_x.float() / 255, b.train_y
    d = shared_adversarial_examples(model, ref, x, y, eps=0.2, step_size=0.2, steps=3, beta1=0.01, beta2=1.0)
    assert d.shape == x.shape
    assert d.abs().max() <= 0.2 + 1e-6
    # signed steps of the ball's radius from the corner: every entry is -eps, 0 or +eps
    assert torch.isin(d.round(decimals=4), torch.tensor([-0.2, 0.0, 0.2])).all()
    assert all(p.grad is None for p in model.parameters())


def test_unlearning_loss_only_counts_potential_poison_and_rewards_disagreement():
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0]])
    label = torch.tensor([0, 0])
    none = shared_unlearning_loss(logits, label, torch.tensor([False, False]))
    assert none == 0
    agree = shared_unlearning_loss(logits, label, torch.tensor([True, False]))
    disagree = shared_unlearning_loss(logits, label, torch.tensor([False, True]))
    assert agree > disagree > 0  # predicting the backdoored model's adversarial label is penalised


def test_purify_returns_a_new_model_and_keeps_the_input():
    model, b = tiny(), bundle()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = defenses.create("sau", n_rounds=1, adv_steps=2).purify(model, b, scale="smoke", progress=False)
    assert out is not model and out.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in out.state_dict().items())


@pytest.mark.parametrize("params,match", [({"n_rounds": 0}, ">= 1"), ({"lr": 0}, "> 0"), ({"adv_steps": 0}, ">= 1"),
                                          ({"pgd_init": "x"}, "valid choices"), ({"beta1": -1}, ">= 0"),
                                          ({"trigger_norm": 0}, "> 0"), ({"optimizer": "rmsprop"}, "sgd, adam")])
def test_bad_hyperparameters(params, match):
    with pytest.raises(ValueError, match=match):
        defenses.create("sau", **params)
