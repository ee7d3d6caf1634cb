"""Per-neuron diagnostics: TAC sees exactly the channels a trigger moves; norms and ranks."""
import pytest
import torch
from torch import nn

from backdoorlab import analysis, attacks
from tiny import tiny_bundle, tiny_model


def test_trigger_activation_change_is_zero_for_an_identity_trigger_and_positive_otherwise():
    model, data = tiny_model(), tiny_bundle(32)
    noop = attacks.create("badnets")
    noop.apply = lambda x: x  # a trigger that changes nothing
    assert torch.all(analysis.trigger_activation_change(model, data, noop, "layer4.1.conv2") == 0)
    badnets = attacks.create("badnets")
    tac = analysis.trigger_activation_change(model, data, badnets, "layer4.1.conv2")
    assert tac.shape == (model.layer4[1].conv2.out_channels,) and tac.sum() > 0


def test_weight_norms_per_output_channel():
    model = tiny_model()
    conv = model.layer4[1].conv2
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[1].fill_(1.0)
    norms = analysis.weight_norms(model, "layer4.1.conv2")
    assert norms[1] == pytest.approx(conv.weight[1].numel() ** 0.5) and norms[0] == 0
    with pytest.raises(ValueError, match="valid choices: conv1"):
        analysis.weight_norms(model, "layer4.1.bn2")


def test_rank_correlation():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert analysis.rank_correlation(a, a ** 3) == pytest.approx(1.0)
    assert analysis.rank_correlation(a, -a) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="same length"):
        analysis.rank_correlation(a, a[:3])


def test_linear_layers_have_norms_too():
    model = nn.Sequential(nn.Linear(3, 2))
    assert analysis.weight_norms(model, "0").shape == (2,)
