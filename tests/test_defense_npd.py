"""NPD: the neural polarizer (insertion, identity init, save/load), target-label selection,
the targeted PGD, the frozen backbone and the defense's contract."""
import math

import pytest
import torch
from torch import nn

from backdoorlab import defenses, models
from backdoorlab.data.bundle import to_float
from backdoorlab.defenses.npd import (Polarized, insert_polarizer, polarized_layers, strongest_wrong, suppression,
                                      target_labels, targeted_perturbation)
from tiny import tiny_bundle as bundle, tiny_model as tiny


def images(n: int = 8) -> torch.Tensor:
    return to_float(bundle(n).train_x)


def test_fresh_polarizer_is_the_identity_and_sits_on_the_named_conv():
    model = tiny()
    x = images()
    polarized = insert_polarizer(models.clone(model), "layer4.1.conv1").eval()
    wrapper = polarized.layer4[1].conv1
    assert isinstance(wrapper, Polarized) and isinstance(wrapper.layer, nn.Conv2d)
    conv, bn = wrapper.polarizer
    channels = model.layer4[1].conv1.in_channels
    assert conv.kernel_size == (1, 1) and conv.bias is None and conv.in_channels == conv.out_channels == channels
    assert torch.equal(conv.weight.squeeze(), torch.eye(channels))
    assert torch.equal(bn.running_mean, torch.zeros(channels)) and torch.equal(bn.running_var, torch.ones(channels))
    assert torch.equal(wrapper.layer.weight, model.layer4[1].conv1.weight)
    # BN with default statistics divides by sqrt(1 + eps): the identity up to eps
    assert torch.allclose(polarized(x), model(x), rtol=1e-4, atol=1e-5)
    # any conv can be polarised (a strided one with a shortcut too), the model stays the same function
    other = insert_polarizer(models.clone(model), "layer3.0.conv1").eval()
    assert torch.allclose(other(x), model(x), rtol=1e-4, atol=1e-5)


def test_unknown_or_non_conv_target_layer_lists_the_choices():
    with pytest.raises(ValueError, match=r"valid choices: .*layer4\.1\.conv1"):
        insert_polarizer(tiny(), "layer9.conv1")
    with pytest.raises(ValueError, match="no Conv2d named 'layer4'"):
        insert_polarizer(tiny(), "layer4")
    twice = insert_polarizer(tiny(), "layer4.1.conv1")
    with pytest.raises(ValueError, match="already has a neural polarizer"):
        insert_polarizer(twice, "layer4.1.conv1")
    with pytest.raises(ValueError, match="valid choices"):
        defenses.create("npd", target_layer="nope").purify(tiny(), bundle(), scale="smoke", progress=False)


def test_module_for_adds_the_polarizer_keys_and_a_saved_result_reloads(tmp_path):
    from safetensors.torch import load_file, save_file

    model, b = tiny(), bundle()
    npd = defenses.create("npd", epochs=1, warm_epochs=1)
    purified = npd.purify(model, b, scale="smoke", progress=False)
    keys = set(purified.state_dict())
    assert {"layer4.1.conv1.layer.weight", "layer4.1.conv1.polarizer.0.weight",
            "layer4.1.conv1.polarizer.1.running_var"} <= keys
    assert "layer4.1.conv1.weight" not in keys
    save_file({k: v.contiguous() for k, v in purified.state_dict().items()}, str(tmp_path / "model.safetensors"))
    reloaded = npd.module_for(model)
    assert set(reloaded.state_dict()) == keys
    reloaded.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    reloaded.eval()
    x = images()
    assert torch.equal(reloaded(x), purified(x))
    assert not torch.allclose(reloaded(x), model(x))  # the trained polarizer came back, not a fresh one


def test_purify_trains_only_the_polarizer_and_keeps_the_input():
    model, b = tiny(), bundle()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = defenses.create("npd", epochs=2, warm_epochs=1).purify(model, b, scale="smoke", progress=False)
    assert out is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the input model changed"
    state = out.state_dict()
    backbone = {k.replace("layer4.1.conv1.layer.", "layer4.1.conv1."): v for k, v in state.items()
                if ".polarizer." not in k}
    assert backbone.keys() == before.keys()
    # weights and BN running statistics alike: SGD's step and weight decay skip the frozen params,
    # and the backbone's BNs stayed in eval mode although fit calls model.train()
    assert all(torch.equal(before[k], v) for k, v in backbone.items()), "the backbone changed"
    conv, bn = out.layer4[1].conv1.polarizer
    assert not torch.equal(conv.weight.squeeze(), torch.eye(conv.in_channels))
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))  # warm-up estimated the BN stats
    assert all(p.requires_grad for p in out.parameters()), "a returned model trains as a whole again"
    assert not out.training
    x = images()
    assert not torch.allclose(out(x), model(x))


def test_polarizer_bn_statistics_only_move_during_the_warm_up():
    model, b = tiny(), bundle()
    out = defenses.create("npd", epochs=2, warm_epochs=0).purify(model, b, scale="smoke", progress=False)
    bn = out.layer4[1].conv1.polarizer[1]
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))  # main loop: BN in eval mode
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    assert not torch.equal(bn.weight, torch.ones_like(bn.weight))  # ... but gamma and beta train


def test_target_label_is_the_strongest_other_class_never_the_true_one():
    logits = torch.tensor([[5.0, 1.0, 3.0, 0.0],   # true class is the argmax: next best is 2
                           [0.0, 9.0, 2.0, 4.0],   # true class 3: class 1
                           [-50., -20., -30., -40.]])  # all below BackdoorBench's -10 mask: still not class 1
    y = torch.tensor([0, 3, 1])
    assert target_labels(logits, y).tolist() == [2, 1, 2]
    random = torch.randn(64, 10)
    yr = torch.randint(0, 10, (64,))
    t = target_labels(random, yr)
    assert (t != yr).all()
    masked = random.clone()
    masked[torch.arange(64), yr] = -math.inf
    assert torch.equal(t, masked.argmax(1))


def test_strongest_wrong_class_and_suppression():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    assert strongest_wrong(probs, torch.tensor([0, 0])).tolist() == [1, 1]  # top is y -> runner-up; else top
    high = suppression(probs, torch.tensor([0, 1]))
    low = suppression(probs, torch.tensor([2, 0]))
    assert high > low > 0
    assert suppression(torch.tensor([[1.0, 0.0]]), torch.tensor([1])) == pytest.approx(-math.log(1.0001), abs=1e-6)


@pytest.mark.parametrize("norm,eps", [("l2", 0.5), ("l2", 3.0), ("linf", 0.05)])
def test_targeted_pgd_stays_in_the_ball_and_moves_towards_the_target(norm, eps):
    model = insert_polarizer(tiny(), "layer4.1.conv1").eval()
    x = images(16)
    with torch.no_grad():
        logits = model(x)
    target = target_labels(logits, logits.argmax(1))
    delta = targeted_perturbation(model, x, target, eps=eps, step_size=0.1, steps=3, norm=norm, early_stop=1.0)
    size = delta.flatten(1).norm(dim=1) if norm == "l2" else delta.flatten(1).abs().amax(1)
    assert (size <= eps * (1 + 1e-5)).all()
    assert all(p.grad is None for p in model.parameters())
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert ce(model((x + delta).clamp(0, 1)), target) < ce(model(x), target)


class Always(nn.Module):
    """Predicts class 0 for every input (a gradient still flows to the input)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(12 * 12, 3)
        with torch.no_grad():
            self.head.bias.copy_(torch.tensor([100.0, 0.0, 0.0]))

    def forward(self, x):
        return self.head(x.flatten(1))


def test_early_stop_freezes_the_perturbation_once_the_batch_hits_its_target():
    torch.manual_seed(0)
    model, x = Always(), images(6)
    target = torch.zeros(6, dtype=torch.int64)
    one = targeted_perturbation(model, x, target, eps=10.0, step_size=0.1, steps=1)
    stopped = targeted_perturbation(model, x, target, eps=10.0, step_size=0.1, steps=4, early_stop=0.6)
    full = targeted_perturbation(model, x, target, eps=10.0, step_size=0.1, steps=4, early_stop=1.0)
    assert torch.equal(stopped, one)  # every sample hits after one step: the remaining steps are discarded
    assert not torch.equal(full, one)  # never "more than 100%": all steps run


def test_default_radius_scales_cifar_by_the_root_of_the_input_size():
    npd = defenses.create("npd")
    assert npd.radius((3, 32, 32)) == pytest.approx(3.0)
    assert npd.radius((1, 28, 28)) == pytest.approx(3.0 * 28 / math.sqrt(3072))
    assert defenses.create("npd", trigger_norm=2.0).radius((1, 28, 28)) == 2.0


def test_loss_gives_gradients_to_the_polarizer_only():
    npd = defenses.create("npd")
    model = npd.module_for(tiny())
    polarizer = polarized_layers(model)["layer4.1.conv1"].polarizer
    model.requires_grad_(False)
    polarizer.requires_grad_(True)
    model.train()  # as fit leaves it
    b = bundle(8)
    loss, logits = npd.loss_fn(0.5)(model, to_float(b.train_x), b.train_y)
    assert not model.training and not polarizer.training
    assert torch.isfinite(loss) and logits.shape == (8, 4)
    loss.backward()
    assert all(p.grad is not None for p in polarizer.parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if ".polarizer." not in n)


@pytest.mark.parametrize("params,match", [
    ({"epochs": 0}, ">= 1"), ({"warm_epochs": -1}, ">= 0"), ({"lr": 0}, "> 0"), ({"warm_lr": -1}, "> 0"),
    ({"adv_lr": 0}, "> 0"), ({"loss_bound": 0}, "> 0"), ({"batch_size": 1}, ">= 2"), ({"inner_steps": 0}, ">= 1"),
    ({"norm": "l1"}, "valid choices: l2, linf"), ({"trigger_norm": 0}, "> 0"), ({"early_stop": 0}, r"\(0, 1\]"),
    ({"early_stop": 1.5}, r"\(0, 1\]"), ({"lmd2": -0.1}, ">= 0"),
    ({"lmd1": 0, "lmd2": 0, "lmd3": 0, "lmd4": 0}, "not all 0"),
    ({"target_layer": ""}, "module name"),
])
def test_bad_hyperparameters(params, match):
    with pytest.raises(ValueError, match=match):
        defenses.create("npd", **params)
