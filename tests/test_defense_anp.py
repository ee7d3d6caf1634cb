"""ANP (defenses/anp.py): mask learning and threshold pruning chosen on clean data."""
from __future__ import annotations

import pytest
import torch

from backdoorlab import defenses
from backdoorlab.defenses import masking
from test_defense_masking import tiny_bundle, tiny_model


def test_masks_stay_in_unit_interval_and_input_is_untouched():
    model, clean = tiny_model(), tiny_bundle()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    anp = defenses.create("anp", nb_iter=6, batch_size=8)
    values = anp.learn_masks(model, clean, scale="smoke")
    assert values.keys() == masking.bn_layers(model).keys()
    flat = torch.cat(list(values.values()))
    assert flat.min() >= 0 and flat.max() <= 1 and (flat < 1).any()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_purify_prunes_exactly_the_masks_below_the_chosen_threshold():
    model, clean = tiny_model(), tiny_bundle()
    anp = defenses.create("anp", nb_iter=6, batch_size=8, acc_ratio=1.0)  # every level passes: 0.90 is chosen
    values = anp.learn_masks(model, clean, scale="smoke", seed=3)
    purified = anp.purify(model, clean, scale="smoke", seed=3, progress=False)
    assert purified is not model and purified.state_dict().keys() == model.state_dict().keys()
    assert anp.selection["threshold"] == 0.9
    for name, bn in masking.bn_layers(purified).items():
        original = dict(model.named_modules())[name]
        pruned = values[name] <= 0.9
        assert (bn.weight[pruned] == 0).all() and torch.equal(bn.weight[~pruned], original.weight[~pruned])
        assert torch.equal(bn.bias, original.bias)  # ANP zeroes the BN scale only


def test_nb_iter_default_depends_on_scale():
    from backdoorlab.defenses.anp import NB_ITER

    assert NB_ITER["paper"] == 2000 and NB_ITER["smoke"] < NB_ITER["default"] < 2000


@pytest.mark.parametrize("params, match", [({"anp_eps": 2.0}, r"anp_eps must be in \[0, 1\]"),
                                           ({"anp_alpha": -0.1}, r"anp_alpha must be in \[0, 1\]"),
                                           ({"pruning_step": 0}, r"pruning_step must be in \(0, 1\]"),
                                           ({"nb_iter": 0}, "nb_iter must be >= 1"),
                                           ({"acc_ratio": 1.5}, r"acc_ratio must be in \[0, 1\]")])
def test_bad_hyperparameters_raise(params, match):
    with pytest.raises(ValueError, match=match):
        defenses.create("anp", **params)
