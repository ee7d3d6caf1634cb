"""Fine-Pruning: ranking, the clean-data pruning rule, pruning kept in the weights."""
from __future__ import annotations

import pytest
import torch

from backdoorlab import data, defenses, models
from backdoorlab.defenses import tools
from backdoorlab.defenses.fp import FinePruning, last_linear, prune_levels
from backdoorlab.train import predict


def small_model(seed: int = 0):
    torch.manual_seed(seed)
    return models.create("preactresnet18", 10, 1, width=4).eval()


def clean_bundle(model, n: int = 64, seed: int = 0) -> data.TensorBundle:
    """Random digits labelled by the model itself, so the unpruned clean accuracy is 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    y = predict(model, x)
    return data.TensorBundle("toy", x, y, x[:4].clone(), y[:4].clone(), 10, (0.5,), (0.25,))


@pytest.mark.parametrize("params, match", [
    (dict(once_prune_ratio=0), r"once_prune_ratio must be in \(0, 1\]"),
    (dict(once_prune_ratio=1.5), r"once_prune_ratio must be in \(0, 1\]"),
    (dict(acc_ratio=1.0), r"acc_ratio .* must be in \[0, 1\)"),
    (dict(acc_ratio=-0.1), r"acc_ratio .* must be in \[0, 1\)"),
    (dict(epochs=-1), r"epochs must be >= 0"),
    (dict(lr=0), r"lr must be > 0"),
])
def test_bad_hyperparameters(params, match):
    with pytest.raises(ValueError, match=match):
        defenses.create("fp", **params)


def test_defaults_are_backdoorbench():
    fp = defenses.create("fp")
    assert (fp.once_prune_ratio, fp.acc_ratio, fp.lr) == (0.01, 0.1, 0.01)
    assert "report" not in fp.params()


def test_last_linear():
    assert last_linear(small_model()) == "linear"
    assert last_linear(models.create("vgg19_bn", 10, 1, width=4)) == "classifier"


def test_prune_levels_match_pruned_copies_and_stop_at_first_failure():
    model = small_model()
    clean = clean_bundle(model)
    feats = tools.activations(model, clean.train_x, "linear", inputs=True)
    order = feats.mean(0).argsort()
    count, trace = prune_levels(model, "linear", feats, clean.train_y, order, 2, 0.1)
    assert trace[0]["level"] == 0 and trace[0]["clean_acc"] == pytest.approx(1.0)
    for row in trace:  # each level's accuracy is that of a real pruned copy on the clean data
        copy = models.clone(model)
        tools.zero_channels(copy, "linear", order[:row["level"]])
        assert tools.accuracy(copy, clean) == pytest.approx(row["clean_acc"], abs=1e-6)
    kept = [r["level"] for r in trace if r["kept"]]
    assert count == kept[-1]
    assert all(r["kept"] for r in trace[:-1])  # stops at the first level that fails
    if not trace[-1]["kept"]:
        assert trace[-1]["clean_acc"] < 0.9


def test_prune_only_zeroes_exactly_the_lowest_activated_channels():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clean = clean_bundle(model)
    fp = FinePruning(epochs=0, once_prune_ratio=0.05)
    purified = fp.purify(model, clean, scale="smoke", progress=False)
    # input untouched, same architecture
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert purified.state_dict().keys() == model.state_dict().keys()
    feats = tools.activations(model, clean.train_x, "linear", inputs=True)
    assert fp.report["order"] == feats.mean(0).argsort().tolist()
    assert fp.report["step"] == round(0.05 * feats.shape[1])
    pruned = fp.report["pruned_channels"]
    assert pruned == fp.report["order"][:fp.report["pruned"]]
    w = purified.linear.weight
    mask = torch.zeros(w.shape[1], dtype=torch.bool)
    mask[pruned] = True
    assert torch.all(w[:, mask] == 0)
    assert torch.equal(w[:, ~mask], model.linear.weight[:, ~mask])
    # the rule: the kept level stays within 10% of the unpruned clean accuracy
    assert tools.accuracy(purified, clean) >= 0.9 * fp.report["trace"][0]["clean_acc"] - 1e-6


def test_pruned_channels_stay_zero_through_fine_tuning():
    model = small_model()
    clean = clean_bundle(model, n=48)
    fp = FinePruning(epochs=1, once_prune_ratio=0.1)
    purified = fp.purify(model, clean, scale="smoke", progress=False)
    pruned = fp.report["pruned_channels"]
    assert fp.report["pruned"] > 0
    assert torch.all(purified.linear.weight[:, pruned] == 0)
    assert not torch.equal(purified.conv1.weight, model.conv1.weight)  # it did fine-tune
    # the pruning survives a state-dict round trip into a clone of the attacked model
    reloaded = models.clone(model)
    reloaded.load_state_dict(purified.state_dict())
    assert torch.all(reloaded.linear.weight[:, pruned] == 0)
