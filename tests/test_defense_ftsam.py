"""FT-SAM: the SAM step fit takes (gradient at w + e_w, weights restored, BN statistics untouched by
the second pass), the ASAM/SAM perturbation, BackdoorBench's label smoothing, the per-batch cosine
option, and the defense's contract."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from backdoorlab import defenses, train
from backdoorlab.data.bundle import to_float
from backdoorlab.defenses.ftsam import per_batch_cosine, perturbation, sam_loss, smooth_kl
from tiny import tiny_bundle as bundle, tiny_model as tiny


def batch(n=12):
    b = bundle()
    return to_float(b.train_x[:n]), b.train_y[:n]


def bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def manual_sam_gradient(model, x, y, rho, adaptive, smoothing):
    """The gradient at w + e_w, computed independently: loss grad at w, e_w from the formula,
    a copy of the model moved to w + e_w, its loss grad (train-mode BN)."""
    def soft_ce(logits):  # same gradient as the KL form
        c = logits.shape[1]
        t = torch.full_like(logits, smoothing / (c - 1))
        t[torch.arange(len(y)), y] = 1 - smoothing
        return -(t * logits.log_softmax(1)).sum(1).mean()

    a = copy.deepcopy(model).train()
    ps = list(a.parameters())
    g = torch.autograd.grad(soft_ce(a(x)), ps)
    if adaptive:
        norm = math.sqrt(sum(float(((p.detach().abs() * gi) ** 2).sum()) for p, gi in zip(ps, g)))
        e = [rho * gi * p.detach() ** 2 / norm for p, gi in zip(ps, g)]
    else:
        norm = math.sqrt(sum(float((gi ** 2).sum()) for gi in g))
        e = [rho * gi / norm for gi in g]
    b = copy.deepcopy(model).train()
    with torch.no_grad():
        for p, ei in zip(b.parameters(), e):
            p.add_(ei)
    return torch.autograd.grad(soft_ce(b(x)), list(b.parameters()))


@pytest.mark.parametrize("adaptive", [True, False])
def test_gradient_is_taken_at_the_perturbed_weights_and_weights_are_restored(adaptive):
    model, (x, y) = tiny().train(), batch()
    rho = 0.5 if adaptive else 0.05
    expected = manual_sam_gradient(model, x, y, rho, adaptive, 0.1)
    before = {k: v.clone() for k, v in model.named_parameters()}
    original = copy.deepcopy(model).train()
    loss, logits = sam_loss(rho, adaptive, 0.1)(model, x, y)
    assert all(torch.equal(before[k], p) for k, p in model.named_parameters()), "weights not restored exactly"
    loss.backward()
    for (name, p), g in zip(model.named_parameters(), expected):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6), name
    # ... and it is not the plain gradient at w
    plain = torch.autograd.grad(smooth_kl(original(x), y, 0.1), list(original.parameters()))
    assert sum(float((p.grad - g).norm()) for p, g in zip(model.parameters(), plain)) > 1e-3
    # the reported value is the clean-point loss, the logits the clean-point logits (as BackdoorBench logs)
    assert torch.allclose(logits, original(x), atol=1e-6)
    assert float(loss.detach()) == pytest.approx(float(smooth_kl(logits, y, 0.1)), abs=1e-6)


def test_one_fit_step_moves_the_weights_by_the_sharpness_aware_gradient():
    model, b = tiny(), bundle()
    order = torch.randperm(len(b.train_y), generator=torch.Generator().manual_seed(0))  # fit's first epoch order
    x, y = to_float(b.train_x[order]), b.train_y[order]
    g = manual_sam_gradient(model, x, y, 1.0, True, 0.1)
    w = [p.detach().clone() for p in model.parameters()]
    recipe = train.Recipe(epochs=1, batch_size=len(b.train_y), lr=0.1, momentum=0.0, weight_decay=0.0,
                          schedule="constant", augment=False)
    train.fit(model, b, recipe, loss_fn=sam_loss(1.0, True, 0.1), progress=False)
    for p, w0, gi in zip(model.parameters(), w, g):
        assert torch.allclose(p.detach(), w0 - 0.1 * gi, rtol=1e-4, atol=1e-6)


def test_second_pass_leaves_batchnorm_running_statistics_alone():
    model, (x, y) = tiny().train(), batch()
    once = copy.deepcopy(model)
    once(x)  # the first pass alone: one running-statistics update
    bn = model.layer1[0].bn1
    momentum = bn.momentum
    sam_loss(2.0, True, 0.1)(model, x, y)
    after, expected = bn_buffers(model), bn_buffers(once)
    assert all(torch.equal(after[k], expected[k]) for k in expected)
    assert not torch.equal(after["layer1.0.bn1.running_mean"], bn_buffers(tiny())["layer1.0.bn1.running_mean"])
    assert bn.momentum == momentum  # restored after the second pass


def test_perturbation_has_radius_rho_in_its_norm():
    torch.manual_seed(0)
    ps = [torch.randn(5, 3), torch.randn(7)]
    gs = [torch.randn(5, 3), torch.randn(7)]
    e = perturbation(ps, gs, 2.0, adaptive=True)
    # ASAM: ||T_w^-1 e|| = rho with T_w = |w|, and e is g * w^2 (direction of |w| * (|w| * g))
    assert math.sqrt(sum(float(((ei / p.abs()) ** 2).sum()) for ei, p in zip(e, ps))) == pytest.approx(2.0, rel=1e-5)
    ratio = torch.cat([(ei / (g * p ** 2)).flatten() for ei, g, p in zip(e, gs, ps)])  # one common factor
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))
    e = perturbation(ps, gs, 2.0, adaptive=False)
    assert math.sqrt(sum(float((ei ** 2).sum()) for ei in e)) == pytest.approx(2.0, rel=1e-5)
    assert torch.allclose(e[1], gs[1] * e[0][0, 0] / gs[0][0, 0])


def test_label_smoothing_is_backdoorbench_s_over_c_minus_1():
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    t = torch.full((6, 5), 0.1 / 4)
    t[torch.arange(6), y] = 0.9
    kl = (t * (t.log() - logits.log_softmax(1))).sum(1).mean()
    assert float(smooth_kl(logits, y, 0.1)) == pytest.approx(float(kl), rel=1e-5)
    assert float(smooth_kl(logits, y, 0.0)) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    # not PyTorch's convention (s / C on every class): the gradients differ
    a = logits.clone().requires_grad_()
    (ga,) = torch.autograd.grad(smooth_kl(a, y, 0.1), a)
    (gb,) = torch.autograd.grad(F.cross_entropy(a, y, label_smoothing=0.1), a)
    assert not torch.allclose(ga, gb)


def test_per_batch_cosine_is_the_code_s_oscillating_schedule():
    model, b = tiny(), bundle()
    seen = []
    # a post hook records the lr each step ran with
    handle = register_optimizer_step_post_hook(
        lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    try:
        with per_batch_cosine(model, 0.01, t_max=4):
            train.fit(model, b, train.Recipe(epochs=3, batch_size=8, schedule="constant"), progress=False)
            other = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
            other.step()  # another optimiser is left alone
    finally:
        handle.remove()
    assert seen[-1] == 0.5
    expected = [0.01 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(9)]
    assert seen[:-1] == pytest.approx(expected)  # falls to 0 at t_max = 4 and rises again
    after = torch.optim.SGD(model.parameters(), lr=0.5)
    after.step()
    assert after.param_groups[0]["lr"] == 0.5  # the hook is gone after the block


@pytest.mark.parametrize("params", [{}, {"adaptive": False, "rho": 0.05}, {"schedule_per_batch": True}])
def test_purify_returns_a_changed_copy_and_leaves_the_input(params):
    model, b = tiny(), bundle()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = defenses.create("ftsam", epochs=2, **params).purify(model, b, scale="smoke", progress=False)
    assert out is not model and out.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in out.state_dict().items())
    assert not out.training


def test_dataset_defaults_follow_backdoorbench():
    d = defenses.create("ftsam")
    assert d.resolved("cifar10") == (2.0, 0.1)
    assert d.resolved("gtsrb") == (8.0, 0.0) and d.resolved("tiny-imagenet") == (8.0, 0.0)
    assert d.resolved("mnist5k") == (2.0, 0.1)
    assert defenses.create("ftsam", rho=1.0, label_smoothing=0.0).resolved("gtsrb") == (1.0, 0.0)


@pytest.mark.parametrize("params,match", [
    ({"epochs": 0}, "epochs"), ({"lr": 0}, "lr"), ({"rho": 0}, "rho"), ({"rho": -1.0}, "rho"),
    ({"label_smoothing": 1.0}, "label_smoothing"), ({"label_smoothing": -0.1}, "label_smoothing"),
    ({"batch_size": 1}, "batch_size"), ({"adaptive": "yes"}, "adaptive"), ({"t_max": 0}, "t_max"),
    ({"schedule_per_batch": 1}, "schedule_per_batch")])
def test_bad_hyperparameters(params, match):
    with pytest.raises(ValueError, match=match):
        defenses.create("ftsam", **params)
