"""Backdoor Existence Coefficient (Zhu, Liang, Wu, NeurIPS 2024): linear CKA, the
trigger-activation-change score, and the BEC identities on the smoke BadNets model."""
import math

import pytest
import torch
from torch import nn

from backdoorlab.defenses.tools import capture
from backdoorlab.reactivation import (backdoor_layers, backdoor_neuron_scores, bec, bec_for, existence_similarity,
                                      layer_features, linear_cka, paired_test_images, top_channels)
from tiny import tiny_model


def official_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """The textbook form: explicit centring matrix H on linear Gram matrices."""
    x, y = x.reshape(len(x), -1).double(), y.reshape(len(y), -1).double()
    n = len(x)
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    kx, ky = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float((kx * ky).sum() / ((kx * kx).sum() * (ky * ky).sum()).sqrt())


# -- CKA ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(60, 12), (10, 40), (16, 3, 4, 4)])  # feature form, Gram form, flattened
def test_cka_identity_and_invariances(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    flat = x.reshape(len(x), -1)
    q, _ = torch.linalg.qr(torch.randn(flat.shape[1], flat.shape[1], generator=g, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 7.5 * x) == pytest.approx(1.0, abs=1e-12)  # isotropic scaling
    assert linear_cka(flat.double() @ q, x) == pytest.approx(1.0, abs=1e-10)  # orthogonal transform
    assert linear_cka(x + 3.0, x) == pytest.approx(1.0, abs=1e-10)  # centring
    # not a constant: an anisotropic rescaling of the features lowers it, and it matches the H K H form
    scale = torch.linspace(0.05, 4.0, flat.shape[1])
    y = flat * scale
    assert linear_cka(x, y) < 0.999
    assert linear_cka(x, y) == pytest.approx(official_cka(x, y), abs=1e-10)


def test_cka_of_independent_features_is_small_and_symmetric():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(400, 8, generator=g), torch.randn(400, 5, generator=g)
    assert linear_cka(x, y) < 0.1
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(official_cka(x, y), abs=1e-10)
    assert linear_cka(x, torch.zeros(400, 3)) == 0.0  # a pruned (constant) representation shares nothing


def test_cka_rejects_unpaired_inputs():
    with pytest.raises(ValueError, match="same inputs"):
        linear_cka(torch.randn(5, 3), torch.randn(6, 3))


# -- scores (tiny model, mechanism) -------------------------------------------------------------
def reference_scores(model, clean, poisoned, layer):
    """The score written out sample by sample (test-only loop)."""
    model.eval()
    with torch.no_grad(), capture(model, [layer]) as out:
        model(poisoned)
        ob = out[layer].clone()
        model(clean)
        oc = out[layer].clone()
    n = len(clean)
    change = sum((ob[i] - oc[i]).flatten(1).norm(dim=1) for i in range(n)) / n
    size = sum(o.flatten().norm() for o in list(ob) + list(oc)) / (2 * n)
    return change / size


def test_scores_match_the_formula_and_are_batch_independent():
    model = tiny_model(0)
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(7, 1, 12, 12, generator=g)
    poisoned = clean.clone()
    poisoned[:, :, -3:, -3:] = 1.0  # a corner patch
    names = backdoor_layers(model)
    assert names == [f"layer{i}.{b}.conv{c}" for i in range(1, 5) for b in (0, 1) for c in (1, 2)]
    scores = backdoor_neuron_scores(model, clean, poisoned, batch_size=3)
    assert list(scores) == names
    for name in names:
        conv = dict(model.named_modules())[name]
        assert scores[name].shape == (conv.out_channels,)
        ref = reference_scores(model, clean, poisoned, name).float()
        torch.testing.assert_close(scores[name], ref, rtol=1e-4, atol=1e-7)
    whole = backdoor_neuron_scores(model, clean, poisoned, batch_size=64)
    for name in names:
        torch.testing.assert_close(whole[name], scores[name], rtol=1e-4, atol=1e-7)


def test_scores_rank_trigger_responsive_channels_first():
    model = tiny_model(0)
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(8, 1, 12, 12, generator=g)
    poisoned = clean.clone()
    poisoned[:, :, :4, :4] = 1.0
    layer = "layer1.0.conv1"
    with torch.no_grad():
        w = dict(model.named_modules())[layer].weight
        w[1:] *= 0.01  # only channel 0 keeps its full response to any input change
    scores = backdoor_neuron_scores(model, clean, poisoned, [layer])[layer]
    assert int(scores.argmax()) == 0 and float(scores[0]) > 20 * float(scores[1:].max())
    assert top_channels({layer: scores}, 0.25)[layer].tolist() == [0]
    # no trigger, no change: every score is exactly zero
    same = backdoor_neuron_scores(model, clean, clean.clone(), [layer])[layer]
    assert torch.equal(same, torch.zeros_like(same))


def test_top_channels_keep_at_least_one():
    scores = {"a": torch.arange(8.0), "b": torch.arange(64.0).flip(0)}
    top = top_channels(scores, 0.1)
    assert top["a"].tolist() == [7]  # floor(0.8) -> at least one
    assert top["b"].tolist() == [0, 1, 2, 3, 4, 5]  # floor(6.4) = 6, the official int()


def test_layer_features_keep_selected_channels():
    model = tiny_model(0)
    x = torch.rand(5, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    full = layer_features(model, x, ["layer2.0.conv1"])["layer2.0.conv1"]
    part = layer_features(model, x, ["layer2.0.conv1"], channels={"layer2.0.conv1": torch.tensor([2, 0])})
    torch.testing.assert_close(part["layer2.0.conv1"], full[:, [2, 0]])


class Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x):  # pragma: no cover - must never run
        raise RuntimeError("computed before validating")


@pytest.mark.parametrize("kwargs, match", [({"normalisation": "minmax"}, "paper, code"),
                                           ({"top_ratio": 0.0}, "top_ratio"), ({"top_ratio": 1.5}, "top_ratio"),
                                           ({"top_ratio": math.nan}, "top_ratio")])
def test_bad_options_raise_before_compute(kwargs, match):
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(ValueError, match=match):
        bec(Boom(), {"d": Boom()}, Boom(), x, x, **kwargs)
    with pytest.raises(ValueError, match=match):
        bec_for(object(), {"d": Boom()}, Boom(), **kwargs)


def test_bad_layers_raise():
    with pytest.raises(ValueError, match="Conv2d"):
        backdoor_neuron_scores(tiny_model(0), torch.rand(2, 1, 12, 12), torch.rand(2, 1, 12, 12), ["layer1"])
    with pytest.raises(ValueError, match="paired"):
        backdoor_neuron_scores(tiny_model(0), torch.rand(2, 1, 12, 12), torch.rand(3, 1, 12, 12))


# -- the smoke BadNets model --------------------------------------------------------------------
def test_smoke_backdoor_scores_exceed_the_clean_models(badnets_result, clean_result):
    clean, poisoned = paired_test_images(badnets_result, 500)
    assert torch.equal(poisoned, badnets_result.attack.apply(clean))
    bd = backdoor_neuron_scores(badnets_result.model, clean, poisoned)
    cl = backdoor_neuron_scores(clean_result.model, clean, poisoned)
    deep = [n for n in bd if n.startswith(("layer3", "layer4"))]
    assert len(bd) == 16 and all(torch.isfinite(s).all() and (s >= 0).all() for s in bd.values())
    # the backdoored model's deep channels react to the trigger far more than a clean model's
    top_bd = sum(float(bd[n].max()) for n in deep) / len(deep)
    top_cl = sum(float(cl[n].max()) for n in deep) / len(deep)
    assert top_bd > 2 * top_cl, (top_bd, top_cl)


def test_smoke_bec_identities(badnets_result, nad_purified, clean_result):
    backdoored, nad_model, clean_model = badnets_result.model, nad_purified[0], clean_result.model
    defended = {"nad": nad_purified, "backdoored": backdoored, "clean": clean_model}
    res = bec_for(badnets_result, defended, clean_result)
    assert res["bec"]["backdoored"] == pytest.approx(1.0, abs=1e-9)
    assert res["bec"]["clean"] == 0.0
    assert res["S"]["backdoored"] == pytest.approx(1.0, abs=1e-9)
    assert all(v == pytest.approx(1.0, abs=1e-9) for v in res["per_layer"]["backdoored"].values())
    assert 0.0 < res["S_clean"] < 1.0 and math.isfinite(res["bec"]["nad"])
    assert res["n_features"] == int(badnets_result.attack.test_mask(badnets_result.data.test_y).sum().clamp(max=500))
    print(f"\nsmoke BadNets: S(NAD)={res['S']['nad']:.4f} S(clean)={res['S_clean']:.4f} BEC(NAD)={res['bec']['nad']:.4f}")

    # existence_similarity agrees with what bec used
    clean_x, poisoned_x = paired_test_images(badnets_result, 2200)
    sim = existence_similarity(backdoored, nad_model, poisoned_x[:500], res["scores"])
    assert sim["S"] == pytest.approx(res["S"]["nad"], abs=1e-9) and sim["k"] == res["k"]

    # the official min-max: within [0, 1], the least similar at 0 and the most similar at 1
    code = bec(backdoored, {"nad": nad_model}, clean_model, clean_x, poisoned_x, normalisation="code",
               scores=res["scores"], n_features=500)
    values = [code["bec_clean"], *code["bec"].values()]
    assert all(0.0 <= v <= 1.0 for v in values) and max(values) == 1.0 and min(values) == 0.0
    assert code["bec_backdoored"] == 1.0
    assert code["S"]["nad"] == pytest.approx(res["S"]["nad"], abs=1e-12)
