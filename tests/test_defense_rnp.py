"""RNP (defenses/rnp.py): unlearning, mask recovery, pruning chosen on clean data."""
from __future__ import annotations

import pytest
import torch

from backdoorlab import defenses
from backdoorlab.defenses import masking
from test_defense_masking import tiny_bundle, tiny_model


def test_unlearning_stops_at_the_clean_threshold_and_copies():
    model, clean = tiny_model(), tiny_bundle()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rnp = defenses.create("rnp", clean_threshold=1.0, unlearning_epochs=5)
    unlearned = rnp.unlearn(model, clean, 8, 0, False)
    assert len(rnp.unlearning_trace) == 1  # every accuracy is <= 1.0: one epoch
    assert unlearned is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_recovered_masks_in_unit_interval():
    model, clean = tiny_model(), tiny_bundle()
    values = defenses.create("rnp", recovering_epochs=2).recover_masks(model, clean, 8, 0, False)
    flat = torch.cat(list(values.values()))
    assert values.keys() == masking.bn_layers(model).keys() and flat.min() >= 0 and flat.max() <= 1


@pytest.mark.parametrize("pruning_by", ["threshold", "number"])
def test_purify_returns_a_pruned_copy(pruning_by):
    model, clean = tiny_model(), tiny_bundle()
    rnp = defenses.create("rnp", unlearning_epochs=2, recovering_epochs=2, pruning_by=pruning_by, batch_size=8,
                          pruning_number=0.02)
    purified = rnp.purify(model, clean, scale="smoke", progress=False)
    assert purified is not model and purified.state_dict().keys() == model.state_dict().keys()
    assert pruning_by in rnp.selection
    zeroed = sum(int((bn.weight == 0).sum()) for bn in masking.bn_layers(purified).values())
    kept = [row for row in rnp.selection["trace"] if row["level"] == rnp.selection[pruning_by]][0]
    assert zeroed == kept["pruned"]


@pytest.mark.parametrize("params, match", [({"pruning_by": "random"}, "valid choices: threshold, number"),
                                           ({"clean_threshold": 1.2}, r"clean_threshold must be in \[0, 1\]"),
                                           ({"recovering_lr": 0}, r"recovering_lr must be in \(0, inf\]"),
                                           ({"unlearning_epochs": 0}, "must be >= 1")])
def test_bad_hyperparameters_raise(params, match):
    with pytest.raises(ValueError, match=match):
        defenses.create("rnp", **params)
