"""CLP (defenses/clp.py): data-free pruning by the channel Lipschitz upper bound."""
from __future__ import annotations

import pytest
import torch

from backdoorlab import defenses, models
from backdoorlab.defenses import clp, masking
from test_defense_masking import tiny_model


def test_uclc_is_spectral_norm_times_bn_scale():
    model = tiny_model()
    scores = clp.uclc(model, 1)
    conv, bn = model.layer2[0].conv1, model.layer2[0].bn2
    k = 3
    expected = torch.linalg.svdvals(conv.weight[k].reshape(conv.weight.shape[1], -1))[0] \
        * (bn.weight[k] / bn.running_var[k].sqrt()).abs()
    assert torch.allclose(scores["layer2.0.bn2"][k], expected, rtol=1e-5)
    assert "layer2.1.bn1" not in scores  # normalises a residual sum: not scored


@pytest.mark.parametrize("arch", ["preactresnet18", "vgg19_bn"])
def test_a_planted_high_lipschitz_channel_is_pruned_without_data(arch):
    torch.manual_seed(0)
    model = models.create(arch, 4, 1, width=8).eval()
    bn_name, conv_name = next(iter(sorted(masking.conv_bn_pairs(model, 1).items(), key=lambda p: -dict(
        model.named_modules())[p[0]].num_features)))
    with torch.no_grad():
        dict(model.named_modules())[conv_name].weight[2] *= 50
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = defenses.create("clp")
    purified = method.purify(model, None)  # data-free: no bundle at all
    bn = dict(purified.named_modules())[bn_name]
    assert bn.weight[2] == 0 and bn.bias[2] == 0
    assert method.selection["per_layer"][bn_name] == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert purified.state_dict().keys() == model.state_dict().keys()


def test_bad_u_raises():
    with pytest.raises(ValueError, match=r"u must be in \[0, inf\]"):
        defenses.create("clp", u=-1)
