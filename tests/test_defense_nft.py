"""NFT (defenses/nft.py): gamma-only masks on the block BNs, layer-wise clip floors, the
regulariser, the cosine-to-eta_min schedule, folding into the weights, one sample per class."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from backdoorlab import data, defenses
from backdoorlab.defenses import masking, nft
from tiny import tiny_bundle, tiny_model

FAST = {"iterations": 10, "batch_size": 8}


class StemNet(nn.Module):
    """A ResNet-shaped toy with a stem BN and a shortcut BN (like the official ResNet-18)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.layer1 = nn.ModuleDict({"conv": nn.Conv2d(4, 6, 3, padding=1), "bn": nn.BatchNorm2d(6),
                                     "shortcut": nn.Sequential(nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6))})
        self.linear = nn.Linear(6, 4)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer1["bn"](self.layer1["conv"](out)) + self.layer1["shortcut"](out)
        return self.linear(out.mean((2, 3)))


def test_masked_layers_are_the_block_bns_and_never_the_stem():
    resnet = tiny_model()
    names = list(nft.masked_layers(resnet))
    assert names == list(masking.bn_layers(resnet)) and len(names) == 16  # PreAct: no stem BN, no shortcut BN
    assert all(n.startswith("layer") for n in names)
    assert list(nft.masked_layers(StemNet())) == ["layer1.bn", "layer1.shortcut.1"]  # shortcut in, stem out
    vgg = tiny_model(name="vgg19_bn")
    assert list(nft.masked_layers(vgg)) == list(masking.bn_layers(vgg))[1:]  # no stages: the first BN is the stem


def test_masks_scale_gamma_only_as_a_model_parameter():
    torch.manual_seed(0)
    model = StemNet().train()
    masks = nft.attach_masks(model)
    assert [p for p in model.parameters() if p.requires_grad] == list(masks.values())  # only masks are trained
    bn = model.layer1["bn"]
    gamma, beta = bn.parametrizations.weight.original.clone(), bn.bias.clone()
    with torch.no_grad():
        masks["layer1.bn"].copy_(torch.linspace(0, 1, 6))
    assert torch.allclose(bn.weight, gamma * torch.linspace(0, 1, 6)) and torch.equal(bn.bias, beta)
    x = torch.randn(8, 6, 5, 5)
    x_hat = (x - x.mean((0, 2, 3), keepdim=True)) / (x.var((0, 2, 3), unbiased=False, keepdim=True) + bn.eps).sqrt()
    expected = (gamma * torch.linspace(0, 1, 6)).view(1, -1, 1, 1) * x_hat + beta.view(1, -1, 1, 1)
    assert torch.allclose(bn(x), expected, atol=1e-5)  # train mode: batch statistics; a masked channel outputs beta
    assert not parametrize.is_parametrized(model.bn1)  # the stem keeps its plain gamma


def test_gamma_masking_equals_the_output_masks_of_channel_masks_in_train_mode():
    values = {}
    torch.manual_seed(1)
    for name, bn in masking.bn_layers(tiny_model()).items():
        values[name] = torch.rand(bn.num_features)
    x = torch.rand(6, 1, 12, 12)
    ours = tiny_model().train()
    for name, mask in nft.attach_masks(ours).items():
        mask.data.copy_(values[name])
    theirs = tiny_model().train()
    with masking.ChannelMasks(theirs) as cm, torch.no_grad():
        for name, mask in cm.mask.items():
            mask.copy_(values[name])
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    assert all(torch.allclose(a, b) for a, b in zip(ours.buffers(), theirs.buffers()))  # same running stats


def test_clip_floors_follow_alpha_exp_minus_beta_l():
    expected = [0.8 * math.exp(-0.5), 0.8 * math.exp(-1), 0.8 * math.exp(-1.5)]
    assert nft.clip_floors(3, 0.8, 0.5) == pytest.approx(expected)
    assert nft.clip_floors(16)[0] == pytest.approx(0.4852, abs=1e-4)
    masks = [torch.tensor([2.0, -1.0, 0.5]), torch.tensor([0.1, 0.2])]
    nft.clip_masks(masks, [0.6, 0.15])
    assert masks[0].tolist() == pytest.approx([1.0, 0.6, 0.6]) and masks[1].tolist() == pytest.approx([0.15, 0.2])


def test_purified_masks_respect_each_layers_floor():
    model, clean = tiny_model(), tiny_bundle()
    # steps large enough to hit the bounds
    defense = defenses.create("nft", lr=50.0, eta_min=0.0, alpha=0.9, beta=0.3, **FAST)
    defense.purify(model, clean, scale="smoke", progress=False)
    floors = nft.clip_floors(16, 0.9, 0.3)
    lows = [float(m.min()) for m in defense.masks.values()]
    assert all(low >= floor - 1e-6 for low, floor in zip(lows, floors))
    assert all(float(m.max()) <= 1 for m in defense.masks.values())
    assert sum(low == pytest.approx(floor) for low, floor in zip(lows, floors)) >= 8  # most layers reach their floor


def test_regulariser_value_on_known_masks():
    masks = [torch.tensor([1.0, 0.5, 0.25]), torch.tensor([0.2])]
    assert float(nft.mask_penalty(masks, 0.001, 50)) == pytest.approx(0.001 / 50 * (0.5 + 0.75 + 0.8))
    assert float(nft.mask_penalty([torch.ones(5)])) == 0.0
    defense = defenses.create("nft", **FAST)
    defense.purify(tiny_model(), tiny_bundle(24), scale="smoke", progress=False)
    assert defense.penalty_weight == pytest.approx(0.001 / 6)  # N_c = 24 samples / 4 classes


def test_lr_schedule_is_torch_cosine_with_eta_min_per_block():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5, eta_min=0.02)
    expected = []
    for _ in range(5):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert nft.lr_schedule(0.05, 0.02, 5) == pytest.approx(expected)


def test_masks_are_folded_into_the_weights_and_only_bn_scales_change():
    model = tiny_model(name="vgg19_bn")  # VGG: its first BN is the unmasked stem
    clean = tiny_bundle()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    defense = defenses.create("nft", **FAST)
    out = defense.purify(model, clean, scale="smoke", progress=False)
    assert out is not model and type(out) is type(model)
    assert list(out.state_dict()) == list(model.state_dict())  # same keys in the same order: no mask left
    assert not any(parametrize.is_parametrized(m) for m in out.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input unchanged
    state = out.state_dict()
    for name in masking.bn_layers(model):
        assert torch.equal(state[f"{name}.bias"], before[f"{name}.bias"])  # bias never masked
        gamma = before[f"{name}.weight"]
        expected = gamma * defense.masks[name] if name in defense.masks else gamma
        assert torch.allclose(state[f"{name}.weight"], expected)
    assert "features.1" not in defense.masks and torch.equal(state["features.1.weight"], before["features.1.weight"])
    bns = set(masking.bn_layers(model))
    assert all(torch.equal(state[k], before[k]) for k in state if k.rsplit(".", 1)[0] not in bns)  # convs, linear
    assert not torch.equal(state["features.1.running_mean"], before["features.1.running_mean"])  # train-mode BN stats


def test_one_per_class_and_purify_with_ten_images():
    bundle = tiny_bundle(40)
    few = bundle.subset(data.clean_subset(bundle, per_class=1, seed=3))
    assert sorted(few.train_y.tolist()) == list(range(4))
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = defenses.create("nft", iterations=10, batch_size=32).purify(model, few, scale="smoke", progress=False)
    assert any(not torch.equal(before[k], v) for k, v in out.state_dict().items())
    assert torch.isfinite(out(few.train_x.float() / 255)).all()


def test_block_bundle_uses_every_clean_sample_equally_often():
    clean = tiny_bundle(10)
    block = nft.block_bundle(clean, 32, seed=0)
    counts = torch.bincount(torch.stack([(clean.train_x == x).flatten(1).all(1).nonzero()[0, 0]
                                         for x in block.train_x]), minlength=10)
    assert len(block.train_y) == 32 and counts.min() >= 3 and counts.max() <= 4


@pytest.mark.parametrize("augmentation", nft.AUGMENTATIONS)
def test_contract_for_every_augmentation(augmentation):
    model, clean = tiny_model(), tiny_bundle()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = defenses.create("nft", augmentation=augmentation, **FAST).purify(model, clean, scale="smoke",
                                                                            progress=False)
    assert out is not model and out.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in out.state_dict().items())
    assert not out.training


@pytest.mark.parametrize("params, match", [
    ({"augmentation": "cutout"}, "valid choices: mixup, cutmix, fmix, none"),
    ({"alpha": 0}, r"alpha must be in \(0, 1\]"),
    ({"alpha": 1.5}, r"alpha must be in \(0, 1\]"),
    ({"beta": -0.1}, r"beta must be in \[0, inf\]"),
    ({"lr": 0}, r"lr must be in \(0, inf\]"),
    ({"eta_min": 0.1}, r"eta_min must be in \[0, 0.05\]"),
    ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
    ({"reg_weight": -1}, "reg_weight"),
    ({"mix_alpha": 0}, "mix_alpha"),
    ({"iterations": 0}, "iterations must be an integer >= 1"),
    ({"blocks": 0}, "blocks must be an integer >= 1"),
    ({"batch_size": 1}, "batch_size must be an integer >= 2"),
])
def test_bad_hyperparameters_raise(params, match):
    with pytest.raises(ValueError, match=match):
        defenses.create("nft", **params)
