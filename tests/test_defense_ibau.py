"""i-BAU: the universal perturbation, the implicit hypergradient and the defense's contract."""
import pytest
import torch
import torch.nn.functional as F

from backdoorlab import defenses
from backdoorlab.defenses.adversarial import pgd, project, universal_perturbation
from backdoorlab.defenses.ibau import hypergradient_surrogate
from tiny import tiny_bundle as bundle, tiny_model as tiny


def test_projection_keeps_the_ball():
    d = torch.randn(3, 1, 5, 5) * 10
    assert torch.allclose(project(d, "l2", 2.0).flatten(1).norm(dim=1), torch.full((3,), 2.0), atol=1e-5)
    assert project(d, "linf", 0.3).abs().max() <= 0.3 + 1e-7
    small = torch.full((1, 1, 2, 2), 0.01)
    assert torch.equal(project(small, "l2", 2.0), small)
    with pytest.raises(ValueError, match="valid choices"):
        project(d, "l1", 1.0)


def test_pgd_increases_the_objective_and_leaves_the_model_alone():
    model, b = tiny(), bundle()
    x, y = b.train_x.float() / 255, b.train_y
    obj = lambda d: F.cross_entropy(model(x + d), y)
    before = [p.detach().clone() for p in model.parameters()]
    d = pgd(obj, torch.zeros_like(x), steps=5, step_size=0.05, norm="linf", eps=0.2)
    assert d.abs().max() <= 0.2 + 1e-6
    assert obj(d) > obj(torch.zeros_like(x))
    assert all(p.grad is None and torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_universal_perturbation_is_one_bounded_image():
    model, b = tiny(), bundle()
    d = universal_perturbation(model, b, batch_size=8, generator=torch.Generator().manual_seed(0), eps=1.0)
    assert d.shape == (1, 1, 12, 12)
    assert d.norm() <= 1.0 + 1e-5


def test_hypergradient_matches_its_definition():
    """The surrogate's parameter gradient equals dPhi/dtheta^T v with v = sum_k J^k g."""
    model, b = tiny(), bundle(8)
    x, y = b.train_x.float() / 255, b.train_y
    d = (torch.randn(1, 1, 12, 12) * 0.1).requires_grad_(True)
    outer = F.cross_entropy(model(x + d), y)
    params = list(model.parameters())
    got = torch.autograd.grad(hypergradient_surrogate(model, x, y, d, outer, 3, 0.1, 1e-3), params)
    # reference: explicit Neumann sum with K = 3 terms
    inner = -F.cross_entropy(model(x + d), y) + 1e-3 * d.pow(2).sum()
    (g,) = torch.autograd.grad(inner, d, create_graph=True)
    phi = d - 0.1 * g
    (g_out,) = torch.autograd.grad(F.cross_entropy(model(x + d), y), d)
    term, v = g_out, g_out.clone()
    for _ in range(2):
        (term,) = torch.autograd.grad(phi, d, grad_outputs=term, retain_graph=True)
        v = v + term
    want = torch.autograd.grad(phi, params, grad_outputs=v, allow_unused=True)
    for a, w in zip(got, want):
        w = torch.zeros_like(a) if w is None else w
        assert torch.allclose(a, w, atol=1e-5, rtol=1e-4)


def test_purify_returns_a_new_model_with_the_same_keys():
    model, b = tiny(), bundle()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = defenses.create("ibau", n_rounds=1, K=2).purify(model, b, scale="smoke", progress=False)
    assert out is not model and out.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in out.state_dict().items())


@pytest.mark.parametrize("params,match", [({"n_rounds": 0}, ">= 1"), ({"K": 0}, ">= 1"), ({"lr": 0}, "> 0"),
                                          ({"portion": 1.5}, r"\[0, 1\]"), ({"norm": "l1"}, "valid choices"),
                                          ({"eps": -1.0}, "> 0"), ({"optimizer": "rmsprop"}, "sgd, adam")])
def test_bad_hyperparameters(params, match):
    with pytest.raises(ValueError, match=match):
        defenses.create("ibau", **params)
