"""PAM: the path-aware step fit takes (gradient at theta + rho * d / ||d||, d = theta_bd - theta, weights
restored), its BatchNorm statistics options, the unlearning batch, the defense's contract and its effect
on the smoke BadNets model."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from backdoorlab import defenses, train
from backdoorlab.data.bundle import to_float
from backdoorlab.defenses.btidbf import mix_generated
from backdoorlab.defenses.pam import PAM, pam_loss, path_offsets
from tiny import tiny_bundle as bundle, tiny_model as tiny

RHO = 0.5


def batch(n=12):
    b = bundle()
    return to_float(b.train_x[:n]), b.train_y[:n]


def grad_at(model, x, y, offsets=None):
    """CE gradient of a train-mode copy of ``model`` moved by ``offsets``, and the copy."""
    m = copy.deepcopy(model).train()
    if offsets is not None:
        with torch.no_grad():
            for p, o in zip(m.parameters(), offsets):
                p.add_(o)
    return torch.autograd.grad(F.cross_entropy(m(x), y), list(m.parameters())), m


def hand_offsets(model, anchor, rho, per_tensor=False, normalise=True):
    """rho * d / ||d|| written out (and two wrong variants, to show the test can tell)."""
    d = [a.detach() - p.detach() for p, a in zip(model.parameters(), anchor.parameters())]
    if not normalise:
        return [rho * t for t in d]
    if per_tensor:
        return [rho * t / t.norm().clamp_min(1e-12) for t in d]
    norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in d))
    return [rho * t / norm for t in d]


def distance(ga, gb):
    return math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(ga, gb)))


def test_registered_and_creatable():
    assert "pam" in defenses.names()
    d = defenses.create("pam")
    assert isinstance(d, PAM) and d.name == "pam" and d.kind == "purification"
    assert (d.rho, d.lr, d.momentum, d.generated_fraction) == (0.5, 0.01, 0.1, 0.2)
    assert d.rounds("paper") == 3 and d.rounds("smoke") == 1
    assert [d.epochs(p, "paper") for p in ("mask", "generator", "unlearn")] == [20, 30, 30]
    assert [d.epochs(p, "smoke") for p in ("mask", "generator", "unlearn")] == [20, 30, 10]


def running(model):
    return {k: v.clone() for k, v in model.named_buffers() if "running" in k}


@pytest.mark.parametrize("bn_statistics", ["current", "perturbed"])
def test_gradient_is_taken_at_theta_plus_rho_d_over_norm_d(bn_statistics):
    model, anchor, (x, y) = tiny(0).train(), tiny(1), batch()
    expected, moved = grad_at(model, x, y, hand_offsets(model, anchor, RHO))  # one train-mode pass at the point
    at_theta = copy.deepcopy(model).train()
    with torch.no_grad():
        theta_logits, moved_logits = at_theta(x), copy.deepcopy(moved)(x)
    before = {k: v.clone() for k, v in model.named_parameters()}
    loss, logits = pam_loss(anchor, RHO, bn_statistics=bn_statistics)(model, x, y)
    assert all(torch.equal(before[k], p) for k, p in model.named_parameters()), "weights not restored exactly"
    loss.backward()
    got = [p.grad for p in model.parameters()]
    for (name, _), g, e in zip(model.named_parameters(), got, expected):
        assert torch.allclose(g, e, rtol=1e-4, atol=1e-6), name
    # the value is the loss at the perturbed point
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(moved_logits, y)), rel=1e-5)
    # a wrong sign, a per-tensor norm or no normalisation would be far off (the test can tell)
    err = distance(got, expected)
    for wrong in (hand_offsets(model, anchor, -RHO), hand_offsets(model, anchor, RHO, per_tensor=True),
                  hand_offsets(model, anchor, RHO, normalise=False), None):
        assert distance(got, grad_at(model, x, y, wrong)[0]) > 100 * err + 1e-3
    # BatchNorm running statistics (and the logits fit logs) come from one pass at theta ("current")
    # or from the pass at the perturbed point (the official code)
    reference, ref_logits = (at_theta, theta_logits) if bn_statistics == "current" else (moved, moved_logits)
    after, expected_stats = running(model), running(reference)
    assert after.keys() == expected_stats.keys() and len(after) > 0
    for k, v in expected_stats.items():
        assert torch.allclose(after[k], v, atol=1e-6), k
    assert torch.allclose(logits, ref_logits, atol=1e-5)


def test_zero_distance_gives_the_plain_gradient():
    model, (x, y) = tiny().train(), batch()
    anchor = copy.deepcopy(model)
    assert all(float(o.abs().max()) == 0 for o in path_offsets(list(model.parameters()),
                                                                list(anchor.parameters()), RHO))
    plain, _ = grad_at(model, x, y)
    loss, _ = pam_loss(anchor, RHO)(model, x, y)
    loss.backward()
    for p, g in zip(model.parameters(), plain):
        assert torch.isfinite(p.grad).all() and torch.allclose(p.grad, g, rtol=1e-5, atol=1e-7)


def test_offsets_have_norm_rho_along_d():
    torch.manual_seed(0)
    params, anchor = [torch.randn(4, 3), torch.randn(5)], [torch.randn(4, 3), torch.randn(5)]
    off = path_offsets(params, anchor, 0.7)
    assert math.sqrt(sum(float((o ** 2).sum()) for o in off)) == pytest.approx(0.7, rel=1e-5)
    ratio = torch.cat([(o / (a - p)).flatten() for o, a, p in zip(off, anchor, params)])
    assert torch.allclose(ratio, ratio[0].expand_as(ratio)) and float(ratio[0]) > 0


def test_one_fit_step_with_the_paper_s_sgd_moves_by_the_path_aware_gradient():
    model, anchor, b = tiny(0), tiny(1), bundle()
    order = torch.randperm(len(b.train_y), generator=torch.Generator().manual_seed(0))  # fit's first epoch order
    x, y = to_float(b.train_x[order]), b.train_y[order]
    g, _ = grad_at(model, x, y, hand_offsets(model, anchor, RHO))
    w = [p.detach().clone() for p in model.parameters()]
    recipe = train.Recipe(epochs=1, batch_size=len(b.train_y), lr=0.01, momentum=0.1, weight_decay=0.0,
                          schedule="constant", augment=False)
    train.fit(model, b, recipe, loss_fn=pam_loss(anchor, RHO), progress=False)
    for p, w0, gi in zip(model.parameters(), w, g):
        assert torch.allclose(p.detach(), w0 - 0.01 * gi, rtol=1e-4, atol=1e-7)


def test_unlearning_batch_replaces_int_fraction_b_plus_one_images_by_the_generator():
    x = torch.rand(10, 1, 6, 6)
    out = mix_generated(x, lambda t: torch.zeros_like(t), 0.2, torch.Generator().manual_seed(0))
    changed = (out != x).flatten(1).any(1)
    assert int(changed.sum()) == 3 and (out[changed] == 0).all() and torch.equal(out[~changed], x[~changed])


def test_purify_uses_the_paper_s_optimiser_leaves_the_input_and_returns_a_changed_copy():
    model, b = tiny(), bundle()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    handle = register_optimizer_step_pre_hook(lambda opt, *_: seen.append(
        (type(opt).__name__, *(opt.param_groups[0].get(k) for k in ("lr", "momentum", "weight_decay")))))
    try:
        d = defenses.create("pam", n_rounds=2, mask_epochs=1, generator_epochs=1, unlearn_epochs=2)
        out = d.purify(model, b, scale="smoke", progress=False)
    finally:
        handle.remove()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert out is not model and out.state_dict().keys() == model.state_dict().keys()
    assert any(not torch.equal(before[k], v) for k, v in out.state_dict().items())
    assert not out.training
    assert ("SGD", 0.01, 0.1, 0.0) in seen and all(s == ("SGD", 0.01, 0.1, 0.0) for s in seen if s[0] == "SGD")
    assert d.distance_ > 0 and d.target_ in range(4)  # two rounds: a detected target
    assert set(d.diagnostics()) == {"target_", "distance_"}


@pytest.mark.parametrize("params,match", [
    ({"rho": 0}, "rho"), ({"rho": -0.5}, "rho"), ({"n_rounds": 0}, "n_rounds"),
    ({"generated_fraction": 0.0}, r"\(0, 1\]"), ({"generated_fraction": 1.5}, r"\(0, 1\]"),
    ({"unlearn_epochs": 0}, "unlearn_epochs"), ({"lr": 0}, "lr"), ({"momentum": 1.0}, "momentum"),
    ({"batch_size": 1}, "batch_size"), ({"bn_statistics": "frozen"}, "current, perturbed")])
def test_bad_hyperparameters(params, match):
    with pytest.raises(ValueError, match=match):
        defenses.create("pam", **params)


@pytest.mark.calibrated
def test_pam_lowers_asr_on_the_smoke_badnets_model(badnets_result):
    from backdoorlab.pipeline import defend

    assert badnets_result.metrics["asr"] > 0.9
    _, row = defend(badnets_result, "pam", progress=False)
    # measured (seed 0, CPU, one thread): ACC 0.912 -> 0.850, ASR 1.000 -> 0.441; on the `make test` smoke
    # model (ACC 0.938, ASR 0.998): 0.854, 0.004
    assert row["asr"] < 0.7 and row["acc"] > 0.75, row
