"""TSBD: neuron weight change, zero reinitialisation, the stage-2 gradient, unlearning's
stopping rule, the defense's contract and its input checks."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from backdoorlab import defenses
from backdoorlab.data.bundle import to_float
from backdoorlab.defenses import tools
from backdoorlab.defenses.tsbd import (activeness_aware_loss, clean_unlearn, neuron_weight_change, top_neurons,
                                       zero_reinit)
from backdoorlab.models import clone
from backdoorlab.train import predict
from tiny import tiny_bundle as bundle, tiny_model as tiny

CONVS = ["conv1"] + [f"layer{i}.{j}.conv{k}" for i in range(1, 5) for j in (0, 1) for k in (1, 2)]
TOTAL = 4 + 4 * 4 + 8 * 4 + 16 * 4 + 32 * 4  # output channels of the 17 convs of the width-4 model


def hand_built():
    """The original model and an 'unlearned' copy whose weights change by known amounts:
    layer4.1.conv2[3] by 0.5 everywhere (NWC 144), layer3.0.conv1[5] by 2.0 and 0.125 in
    two weights (NWC 2.125), conv1[1] by -0.25 everywhere (NWC 2.25 but below the others
    per weight); a shortcut conv, a BN and the linear head change a lot but are not conv
    neurons TSBD ranks or zeroes. The changed weights hold values whose differences are
    exact in float32 (exact ties)."""
    before = tiny()
    with torch.no_grad():
        before.layer4[1].conv2.weight[3] = 0.25
        before.layer3[0].conv1.weight[5].view(-1)[[7, 20]] = 1.0
        before.conv1.weight[1] = 0.5
    after = clone(before)
    with torch.no_grad():
        after.layer4[1].conv2.weight[3] = 0.75
        after.layer3[0].conv1.weight[5].view(-1)[7] = 3.0
        after.layer3[0].conv1.weight[5].view(-1)[20] = 1.125
        after.conv1.weight[1] = 0.25
        after.layer2[0].shortcut[0].weight[0] += 10.0
        after.layer4[1].bn2.weight += 5.0
        after.linear.weight += 5.0
    return before, after


def test_nwc_is_the_per_neuron_l1_change_of_non_shortcut_convs():
    before, after = hand_built()
    nwc = neuron_weight_change(before, after)
    assert list(nwc) == CONVS  # forward order, shortcut convs left out
    assert sum(len(v) for v in nwc.values()) == TOTAL
    expected = {("layer4.1.conv2", 3): 0.5 * 32 * 9, ("layer3.0.conv1", 5): 2.125, ("conv1", 1): 0.25 * 9}
    for name, values in nwc.items():
        for channel, value in enumerate(values.tolist()):
            assert value == pytest.approx(expected.get((name, channel), 0.0), abs=1e-5)
    assert neuron_weight_change(before, after.state_dict()).keys() == nwc.keys()  # a state dict works too


def test_top_neurons_rank_globally_with_int_of_total_times_n():
    before, after = hand_built()
    nwc = neuron_weight_change(before, after)

    def chosen(n):
        return {(name, int(c)) for name, mask in top_neurons(nwc, n).items() for c in mask.nonzero().flatten()}

    assert chosen(1.5 / TOTAL) == {("layer4.1.conv2", 3)}  # int(1.5) = 1 neuron
    assert chosen(2.5 / TOTAL) == {("layer4.1.conv2", 3), ("conv1", 1)}  # 2.25 > 2.125
    assert chosen(3.5 / TOTAL) == {("layer4.1.conv2", 3), ("layer3.0.conv1", 5), ("conv1", 1)}
    assert chosen(0.5 / TOTAL) == set()
    assert len(chosen(0.5)) == int(TOTAL * 0.5)  # ties (NWC 0) fill up in layer order
    assert chosen(4.5 / TOTAL) - chosen(3.5 / TOTAL) == {("conv1", 0)}  # the first tie in layer order


def test_zero_reinit_zeroes_the_top_m_of_the_pooled_changes_in_the_original_model():
    before, after = hand_built()
    original = {k: v.clone() for k, v in before.state_dict().items()}
    # three neurons: pool = 288 weights of 0.5, 72 of layer3.0.conv1[5] (2.0, 0.125, 70 zeros), 9 of 0.25 -> 369;
    # m 0.7 keeps int(258.3) = 258 values: 2.0 and 257 of the 0.5s, so the threshold is 0.5 and all 0.5s go
    out = zero_reinit(before, before, after, 3.5 / TOTAL, 0.7)
    assert out is not before and all(torch.equal(original[k], v) for k, v in before.state_dict().items())
    state = out.state_dict()
    assert (state["layer4.1.conv2.weight"][3] == 0).all()
    w = state["layer3.0.conv1.weight"][5].flatten()
    assert w[7] == 0 and w[20] == 1.0  # 0.125 < 0.5: kept, at the original's value (not the unlearned 1.125)
    zeroed = {k for k in state if not torch.equal(state[k], original[k])}
    assert zeroed == {"layer4.1.conv2.weight", "layer3.0.conv1.weight"}  # conv1 (0.25), BN, linear, shortcut untouched
    changed = sum(int((state[k] != original[k]).sum()) for k in zeroed)
    assert changed == 288 + 1
    # everything not zeroed is the ORIGINAL model's value, not the unlearned one's
    assert torch.equal(state["layer4.1.bn2.weight"], original["layer4.1.bn2.weight"])
    assert torch.equal(state["linear.weight"], original["linear.weight"])
    assert torch.equal(state["layer2.0.shortcut.0.weight"], original["layer2.0.shortcut.0.weight"])


@pytest.mark.parametrize("n,m,count", [
    (3.5 / TOTAL, 0.001, 0),  # int(0.369) = 0 sub-weights
    (3.5 / TOTAL, 0.003, 1),  # the single largest change (2.0)
    (2.5 / TOTAL, 0.97, 288),  # two neurons (297 weights): int(288.09) = 288 values, the 0.5s; the 0.25s stay
    (3.5 / TOTAL, 1.0, 288 + 72 + 9),  # threshold 0: every weight of the three neurons
    (1.5 / TOTAL, 0.5, 288),  # one neuron, all ties at 0.5 are zeroed
    (0.5 / TOTAL, 0.7, 0),  # no neuron
])
def test_zero_reinit_counts(n, m, count):
    before, after = hand_built()
    out = zero_reinit(before, before, after, n, m)
    assert sum(int((p != q).sum()) for p, q in zip(out.parameters(), before.parameters())) == count


def test_zero_reinit_copies_the_model_it_is_given():
    before, after = hand_built()
    other = tiny(seed=1)
    out = zero_reinit(other, before, after, 1.5 / TOTAL, 1.0)
    assert (out.layer4[1].conv2.weight[3] == 0).all()
    assert torch.equal(out.layer4[1].conv2.weight[:3], other.layer4[1].conv2.weight[:3])


def manual_stage2_gradient(model, x, y, r, alpha, norm):
    """(1 - alpha) g1 + alpha g2 on deep copies, as the official code computes it."""
    first = clone(model).train()
    g1 = torch.autograd.grad(F.cross_entropy(first(x), y), list(first.parameters()))
    second = clone(model).train()
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in g1]))
    with torch.no_grad():
        for p, g in zip(second.parameters(), g1):
            p += r * g / (g.norm() if norm == "tensor" else total)
    g2 = torch.autograd.grad(F.cross_entropy(second(x), y), list(second.parameters()))
    return [(1 - alpha) * a + alpha * b for a, b in zip(g1, g2)], g1, first


@pytest.mark.parametrize("norm", ["tensor", "global"])
@pytest.mark.parametrize("alpha", [0.7, 0.0])
def test_stage2_loss_yields_the_mixed_gradient(norm, alpha):
    model, b = tiny(), bundle()
    x, y = to_float(b.train_x[:16]), b.train_y[:16]
    r = 0.05
    expected, g1, first = manual_stage2_gradient(model, x, y, r, alpha, norm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    loss, logits = activeness_aware_loss(r, alpha, norm)(model, x, y)
    # the parameters are back at theta exactly; the BN statistics moved once (one forward at theta)
    for (k, v), (_, w) in zip(model.state_dict().items(), first.state_dict().items()):
        assert torch.equal(v, w if "running" in k or "num_batches" in k else before[k]), k
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)  # the value is CE(theta)
    model.zero_grad()
    loss.backward()
    for (name, p), g in zip(model.named_parameters(), expected):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6), name
    if alpha > 0:  # the perturbation matters: the result is not plain CE's gradient
        assert max((p.grad - g).abs().max().item() for p, g in zip(model.parameters(), g1)) > 1e-4


@pytest.mark.parametrize("target", [False, True])
def test_unlearning_stops_at_the_first_epoch_at_or_below_the_threshold(target):
    model, b = tiny(), bundle()
    # clean unlearning of data the model fits (its own predictions: accuracy 1), or poison unlearning: every
    # image labelled with the target class, the accuracy is then an ASR
    labels = torch.zeros_like(b.train_y) if target else predict(model, b.train_x)
    b = dataclasses.replace(b, train_y=labels)
    assert target or tools.accuracy(model, b) == 1.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    u = clean_unlearn(model, b, lr=0.05, max_epochs=50, acc_threshold=0.1, batch_size=8, progress=False)
    assert u.reached and u.epochs == len(u.accuracy) and u.accuracy[-1] <= 0.1
    assert all(a > 0.1 for a in u.accuracy[:-1])
    assert u.accuracy[-1] == pytest.approx(tools.accuracy(u.model, b))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert u.grad_norm is None


def test_unlearning_stops_at_the_cap_and_records_the_first_epochs_gradient_norm():
    model, b = tiny(), bundle()
    lr = 1e-3
    # one batch per epoch: the first SGD step moves each neuron by lr * its gradient's L1 norm
    u = clean_unlearn(model, b, lr=lr, max_epochs=1, acc_threshold=0.0, batch_size=32, progress=False,
                      record_layer="layer4.1.conv2")
    assert u.epochs == 1 and u.grad_norm.shape == (32,) and (u.grad_norm > 0).all()
    moved = neuron_weight_change(model, u.model)["layer4.1.conv2"]
    assert torch.allclose(moved, lr * u.grad_norm, rtol=1e-3, atol=1e-7)
    capped = clean_unlearn(model, b, lr=1e-9, max_epochs=3, acc_threshold=0.0, batch_size=8, progress=False,
                           record_layer="layer4.1.conv2.weight")
    assert capped.epochs == 3 and not capped.reached


def test_contract_and_diagnostics():
    model, b = tiny(), bundle()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    defense = defenses.create("tsbd", lr_unlearn=0.05, max_unlearn_epochs=20, ft_epochs=1)
    out = defense.purify(model, b, scale="smoke", progress=False)
    assert out is not model and out.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in out.state_dict().items())
    assert defense.n_ratio_ in defense.neuron_ratios and 1 <= defense.unlearn_epochs_ <= 20
    assert list(defense.nwc_) == CONVS and defense.zeroed_["neurons"] == int(TOTAL * defense.n_ratio_)
    kept = [row["level"] for row in defense.selection_ if row["kept"]]
    assert defense.n_ratio_ == (kept[-1] if kept else defense.neuron_ratios[0])
    assert "n_ratio_" not in defense.params()


def test_fixed_ratio_without_fine_tuning_is_the_zero_reinitialised_original():
    model, b = tiny(), bundle()
    defense = defenses.create("tsbd", n_ratio=0.2, lr_unlearn=0.05, max_unlearn_epochs=20, ft_epochs=0)
    out = defense.purify(model, b, scale="smoke", progress=False)
    assert defense.n_ratio_ == 0.2 and defense.selection_ == [] and defense.zeroed_["weights"] > 0
    for (name, p), q in zip(out.named_parameters(), model.parameters()):
        if "conv" in name and "shortcut" not in name:
            assert ((p == q) | (p == 0)).all(), name  # zeroed or the original value
        else:
            assert torch.equal(p, q), name  # BN, linear and shortcut untouched


@pytest.mark.parametrize("params,match", [
    ({"n_ratio": 0}, "n_ratio"), ({"n_ratio": 1.5}, "n_ratio"), ({"m_ratio": 0}, "m_ratio"),
    ({"m_ratio": 1.2}, "m_ratio"), ({"r": -0.1}, "r must"), ({"alpha": 1.5}, "alpha"),
    ({"lr_unlearn": 0}, "lr_unlearn"), ({"lr_ft": -1}, "lr_ft"), ({"acc_threshold": 2}, "acc_threshold"),
    ({"acc_drop": -0.1}, "acc_drop"), ({"max_unlearn_epochs": 0}, "max_unlearn_epochs"),
    ({"batch_size": 1}, "batch_size"), ({"ft_epochs": -1}, "ft_epochs"), ({"norm": "l1"}, "tensor, global"),
    ({"neuron_ratios": ()}, "neuron_ratios"), ({"neuron_ratios": (0.1, 2.0)}, "neuron_ratios"),
    ({"neuron_ratios": "0.1"}, "neuron_ratios"),
])
def test_bad_hyperparameters(params, match):
    with pytest.raises(ValueError, match=match):
        defenses.create("tsbd", **params)


def test_bad_function_inputs():
    before, after = hand_built()
    with pytest.raises(ValueError, match="valid choices"):
        clean_unlearn(before, bundle(), max_epochs=1, batch_size=8, record_layer="linear", progress=False)
    with pytest.raises(ValueError, match="max_epochs"):
        clean_unlearn(before, bundle(), max_epochs=0, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="same architecture"):
        neuron_weight_change(before, tiny(name="vgg19_bn"))
    with pytest.raises(ValueError, match="m_ratio"):
        zero_reinit(before, before, after, 0.1, 1.5)
    with pytest.raises(ValueError, match="n_ratio"):
        top_neurons(neuron_weight_change(before, after), -0.1)
    with pytest.raises(ValueError, match="tensor, global"):
        activeness_aware_loss(norm="l2")
