"""FST: head re-initialisation, the norm constraint and the defense's contract."""
import pytest
import torch
from torch import nn

from backdoorlab import defenses
from backdoorlab.defenses.fst import head_name, reinitialise
from tiny import tiny_bundle as bundle, tiny_model as tiny


def test_head_is_found_for_both_architectures():
    assert head_name(tiny()) == "linear"
    assert head_name(tiny(name="vgg19_bn")) == "classifier"


def test_reinitialise_is_uniform_in_the_fan_in_bound():
    head = nn.Linear(16, 4)
    old = head.weight.detach().clone()
    reinitialise(head, torch.Generator().manual_seed(1))  # not 0: conftest seeds the global state with 0, and
    assert not torch.equal(old, head.weight)  # nn.Linear's own init draws the same uniform values from it
    assert head.weight.abs().max() <= 1 / 4 and head.bias.abs().max() <= 1 / 4


def test_purified_head_keeps_the_original_norm_and_moves_away():
    model, b = tiny(), bundle()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = defenses.create("fst", epochs=2).purify(model, b, scale="smoke", progress=False)
    assert out is not model and out.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.allclose(out.linear.weight.norm(), model.linear.weight.norm(), rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity(out.linear.weight.flatten(), model.linear.weight.flatten(), 0)
    assert cos < 0.5


@pytest.mark.parametrize("params,match", [({"epochs": 0}, ">= 1"), ({"lr": 0}, "> 0"), ({"alpha": -1}, ">= 0")])
def test_bad_hyperparameters(params, match):
    with pytest.raises(ValueError, match=match):
        defenses.create("fst", **params)
