"""The retuning attack, QRA and linear mode connectivity (Min et al., NeurIPS 2024).

The purified models are the smoke BadNets model after NAD (ASR 0.024) and after FT-SAM (0.417),
both trained and purified with the calibrated thread count (tests/conftest.py)."""
from __future__ import annotations

import importlib

import pytest
import torch

from backdoorlab import attacks, data, metrics
from backdoorlab.reactivation import (QRAGenerator, interpolate, path_metrics, qra, recompute_bn, retune,
                                      retuning_set)
from tiny import tiny_model

# the package exports a function of the same name
retune_module = importlib.import_module("backdoorlab.reactivation.retune")
qra_module = importlib.import_module("backdoorlab.reactivation.qra")


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the retuning attack -----------------------------------------------------------------------

def test_retuning_set_has_exactly_poison_num_poisoned_samples(badnets_result):
    bundle, target = badnets_result.data, badnets_result.attack.target
    clean = bundle.subset(data.clean_subset(bundle, 0.02, seed=3))
    retune_set, mask = retuning_set(badnets_result, poison_num=5, clean_ratio=0.02, seed=3)
    assert len(retune_set.train_y) == len(clean.train_y) == len(mask)
    assert int(mask.sum()) == 5
    assert (retune_set.train_y[mask] == target).all()
    assert (clean.train_y[mask] != target).all()  # poisoned from non-target images
    changed = (retune_set.train_x[mask] != clean.train_x[mask]).flatten(1).any(1)
    assert changed.all()  # every poisoned sample carries the trigger
    assert torch.equal(retune_set.train_x[~mask], clean.train_x[~mask])  # the rest untouched
    assert torch.equal(retune_set.train_y[~mask], clean.train_y[~mask])
    assert torch.equal(retune_set.test_x, bundle.test_x)
    none_set, none_mask = retuning_set(badnets_result, poison_num=0, clean_ratio=0.02, seed=3)
    assert not none_mask.any() and torch.equal(none_set.train_x, clean.train_x)


@pytest.mark.parametrize("poison_num", [-1, 10_000, 2.5])
def test_bad_poison_num_fails_before_compute(badnets_result, nad_purified, monkeypatch, poison_num):
    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking its input")

    monkeypatch.setattr(retune_module, "fit", no_training)
    with pytest.raises(ValueError, match="poison_num"):
        retune(nad_purified[0], badnets_result, poison_num=poison_num)
    with pytest.raises(ValueError, match="clean ratio"):
        retune(nad_purified[0], badnets_result, clean_ratio=0.0)


def test_retuning_attack_reactivates_the_nad_purified_backdoor(badnets_result, nad_purified):
    purified, row = nad_purified
    before = _state(purified)
    attacked = [retune(purified, badnets_result, poison_num=5, seed=s)[1] for s in range(3)]
    control = [retune(purified, badnets_result, poison_num=0, seed=s)[1] for s in range(3)]  # clean retuning
    assert _same(before, _state(purified))  # the input model is not modified
    assert all(r["poison_num"] == 5 and r["clean_samples"] == 40 for r in attacked)
    ra = [r["p_asr"] for r in attacked]
    ctrl = [r["p_asr"] for r in control]
    # measured: NAD-purified ASR 0.024; retuned on 40 clean + 5 poisoned samples 0.703, 0.820, 0.783;
    # on the 40 clean samples alone 0.044, 0.124, 0.131 (the superficial safety the paper reports)
    assert min(ra) >= row["asr"] + 0.5
    assert all(a >= c + 0.3 for a, c in zip(ra, ctrl))


# -- QRA -----------------------------------------------------------------------------------------

def test_qra_clean_images_are_not_the_poisoned_samples():
    # BadNets of seed 0 poisons 400 of 4000 samples: a random 500 hold ~50. Drawn from the attack's own random
    # stream, all 400 poisoned samples would come first.
    poisoned = attacks.create("badnets").poison_indices(torch.arange(4000) % 10, 0.1, seed=0)
    pick = qra_module.attacker_clean_indices(4000, 500, seed=0)
    assert len(pick.unique()) == 500 and 25 <= int(torch.isin(pick, poisoned).sum()) <= 80


def test_qra_delta_respects_eps_exactly():
    eps = 16 / 255
    gen = QRAGenerator((1, 28, 28), hidden=16, eps=eps, mean=(0.13,), std=(0.31,))
    assert gen.net[0].in_features == 784 and gen.net[-2].out_features == 784
    with torch.no_grad():
        gen.net[-2].weight.mul_(1000)  # saturate the tanh
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        delta, moved = gen(x), gen.perturb(x)
    eps32 = float(torch.tensor(eps))  # the budget as a float32, the perturbation's dtype
    assert delta.shape == x.shape
    assert float(delta.abs().max()) == eps32  # the budget is reached, and never exceeded
    assert float((moved - x).abs().max()) <= eps32 + 1e-6
    assert moved.min() >= 0 and moved.max() <= 1
    with pytest.raises(ValueError, match="eps"):
        QRAGenerator((1, 28, 28), eps=0.0)


def test_qra_wakes_the_purified_model_but_not_the_clean_one(badnets_result, ftsam_purified, clean_result):
    purified, row = ftsam_purified
    retuned, _ = retune(purified, badnets_result, poison_num=5)
    before = [_state(m) for m in (purified, retuned, clean_result.model)]
    gen, out = qra(purified, retuned, clean_result.model, badnets_result, epochs=8, clean_num=128, poison_num=128,
                   batch_size=32)
    assert all(_same(b, _state(m)) for b, m in zip(before, (purified, retuned, clean_result.model)))
    assert out["base_asr"] == pytest.approx(row["asr"])
    assert out["clean_num"] == 128 and out["poison_num"] == 128
    # measured: f_P (FT-SAM) ASR 0.417 -> 0.506; f_C ASR 0.002, clean-sample ASR 0.098. On the NAD model (ASR
    # 0.024) these 8 epochs move it only to 0.038
    assert out["asr"] >= out["base_asr"] + 0.04
    assert out["clean_model_asr"] <= 0.05  # the perturbation wakes the backdoor, it is no plain adversarial example
    assert out["clean_model_clean_asr"] <= 0.2  # target-class test images count here (~10 %)
    with pytest.raises(ValueError, match="clean_num"):
        qra(purified, retuned, clean_result.model, badnets_result, clean_num=0)


# -- linear mode connectivity ------------------------------------------------------------------------

def _pair():
    a, b = tiny_model(0), tiny_model(1)
    for m in b.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
    return a, b


def test_interpolate_endpoints_exact_and_midpoint():
    a, b = _pair()
    sa, sb = _state(a), _state(b)
    assert _same(_state(interpolate(a, b, 0.0)), sa)
    assert _same(_state(interpolate(a, b, 1.0)), {k: (sb[k] if v.is_floating_point() else v) for k, v in sa.items()})
    mid = _state(interpolate(a, b, 0.5))
    for k, v in sa.items():
        if v.is_floating_point():
            torch.testing.assert_close(mid[k], (v + sb[k]) / 2)
        else:  # integer buffers from model_a
            assert torch.equal(mid[k], v)
    assert any("running_mean" in k and not torch.equal(mid[k], sa[k]) for k in sa)  # BN stats interpolated
    assert _same(_state(a), sa) and _same(_state(b), sb)
    with pytest.raises(ValueError, match="architecture"):
        interpolate(a, tiny_model(0, "vgg19_bn"), 0.5)
    with pytest.raises(ValueError, match="finite"):
        interpolate(a, b, float("nan"))


def test_recompute_bn_resets_statistics():
    a, _ = _pair()
    images = torch.rand(32, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    recompute_bn(a, images, batch_size=8)
    bn = next(m for m in a.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert bn.momentum == 0.1 and not a.training


def test_path_metrics_rows_and_endpoints(badnets_result, nad_purified):
    backdoored, purified = badnets_result.model, nad_purified[0]
    rows = path_metrics(backdoored, purified, badnets_result, ts=[0.0, 0.5, 1.0])
    assert [r["t"] for r in rows] == [0.0, 0.5, 1.0]
    for row, model in ((rows[0], backdoored), (rows[-1], purified)):
        expected = metrics.evaluate(model, badnets_result.data, badnets_result.attack)
        assert row["acc"] == expected["acc"] and row["asr"] == expected["asr"]
    recomputed = path_metrics(backdoored, purified, badnets_result, ts=torch.linspace(0, 1, 3), bn="recompute")
    assert len(recomputed) == 3 and all(0 <= r["asr"] <= 1 for r in recomputed)
    with pytest.raises(ValueError, match="interpolate, recompute"):
        path_metrics(backdoored, purified, badnets_result, bn="running")


def test_exact_purification_oracle_unlearns_the_trigger_and_leaves_the_input(badnets_result):
    from backdoorlab.reactivation import exact_purification

    before = {k: v.clone() for k, v in badnets_result.model.state_dict().items()}
    model, row = exact_purification(badnets_result, seed=0)
    assert all(torch.equal(before[k], v) for k, v in badnets_result.model.state_dict().items())
    assert row["triggered_samples"] > 0 and row["clean_samples"] >= row["triggered_samples"]
    # measured at smoke: ASR 0.998 -> ~0.0 (the trigger is shown with its true labels), ACC ~0.9
    assert row["asr"] < 0.2 and row["acc"] > badnets_result.metrics["acc"] - 0.15
    with pytest.raises(ValueError, match="epochs"):
        exact_purification(badnets_result, epochs=0)
