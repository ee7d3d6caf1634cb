"""DBD: SimCLR views and NT-Xent, frozen-backbone warm-up, the loss split, MixMatch phase."""
from __future__ import annotations

import pytest
import torch

from backdoorlab import defenses
from backdoorlab.defenses.dbd import nt_xent, symmetric_ce, views
from test_defense_abl import tiny_bundle, tiny_model


def test_views_are_batched_seeded_and_in_range():
    x = torch.rand(16, 1, 12, 12)
    a = views(x, torch.Generator().manual_seed(0))
    b = views(x, torch.Generator().manual_seed(0))
    c = views(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    flat = torch.full((4, 1, 12, 12), 0.3)  # geometry alone (no jitter) cannot change a constant image
    torch.testing.assert_close(views(flat, torch.Generator().manual_seed(0), jitter=0.0), flat)


def test_nt_xent_prefers_matching_pairs():
    z = torch.randn(8, 16)
    assert nt_xent(z, z, 0.5) < nt_xent(z, torch.randn(8, 16), 0.5)


def test_symmetric_ce_reduces_to_ce_with_beta_zero():
    logits, y = torch.randn(5, 10), torch.randint(0, 10, (5,))
    torch.testing.assert_close(symmetric_ce(logits, y, alpha=1.0, beta=0.0),
                               torch.nn.functional.cross_entropy(logits, y))


def test_warmup_trains_only_the_classifier():
    model, data = tiny_model(), tiny_bundle()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    defenses.create("dbd").warmup(model, data, epochs=1, batch=16, seed=0, progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"linear.weight", "linear.bias"}


def test_split_is_a_partition_by_loss():
    model, data = tiny_model(), tiny_bundle(100)
    trusted, rest = defenses.create("dbd", epsilon=0.3).split(model, data)
    assert len(trusted) == 30 and len(rest) == 70
    assert len(set(trusted.tolist()) | set(rest.tolist())) == 100


def test_train_runs_all_phases_and_keeps_architecture():
    model, data = tiny_model(), tiny_bundle()
    keys = set(model.state_dict())
    dbd = defenses.create("dbd", self_epochs=1, warmup_epochs=1, semi_epochs=1, batch_size=16, batch_size_self=16)
    out = dbd.train(model, data, scale="smoke", progress=False)
    assert set(out.state_dict()) == keys
    assert dbd.trusted_ is not None and len(dbd.trusted_) == 32
    assert all(torch.isfinite(p).all() for p in out.parameters())


def test_budget_follows_the_scale():
    paper = defenses.create("dbd").budget("paper")
    assert (paper["self"], paper["warmup"], paper["semi"], paper["batch_self"], paper["crop"]) == (100, 10, 100, 512, 0.08)


@pytest.mark.parametrize("params", [{"epsilon": 0}, {"epsilon": 1}, {"temperature": 0}, {"self_epochs": 0},
                                    {"lambda_u": -1}, {"augmentations": 0}, {"min_crop_area": 1.5}])
def test_bad_hyperparameters(params):
    with pytest.raises(ValueError, match="must be"):
        defenses.create("dbd", **params)
