"""BNP (defenses/bnp.py): KL between clean pre-activation statistics and BN running statistics."""
from __future__ import annotations

import pytest
import torch

from backdoorlab import defenses
from backdoorlab.defenses import bnp, masking
from test_defense_masking import tiny_bundle, tiny_model


def matched_model(clean):
    """A model whose running statistics equal the clean data's (so every KL is ~0)."""
    model = tiny_model()
    for _ in range(2):  # later layers' stats depend on earlier ones in eval mode: settle them
        stats = masking.bn_input_stats(model, clean.train_x)
        with torch.no_grad():
            for name, bn in masking.bn_layers(model).items():
                bn.running_mean.copy_(stats[name][0])
                bn.running_var.copy_(stats[name][1])
    return model


def test_kl_is_zero_when_statistics_match_and_positive_for_a_shifted_channel():
    clean = tiny_bundle()
    model = matched_model(clean)
    with torch.no_grad():
        model.layer4[1].bn2.running_mean[5] += 5 * model.layer4[1].bn2.running_var[5].sqrt()
    scores = bnp.kl_scores(model, clean.train_x)
    assert scores["layer1.0.bn1"].abs().max() < 1e-3
    assert scores["layer4.1.bn2"].argmax() == 5 and scores["layer4.1.bn2"][5] > 10


def test_the_shifted_channel_is_pruned_and_only_clean_data_is_used():
    clean = tiny_bundle()
    model = matched_model(clean)
    with torch.no_grad():
        model.layer4[1].bn2.running_mean[5] += 5 * model.layer4[1].bn2.running_var[5].sqrt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    poisoned_test = clean.test_x.clone().fill_(255)  # the test split is never read
    method = defenses.create("bnp")
    purified = method.purify(model, type(clean)(**{**clean.__dict__, "test_x": poisoned_test}))
    bn = purified.layer4[1].bn2
    assert bn.weight[5] == 0 and bn.bias[5] == 0 and method.selection["per_layer"]["layer4.1.bn2"] == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_u_raises():
    with pytest.raises(ValueError, match=r"u must be in \[0, inf\]"):
        defenses.create("bnp", u=-0.5)
