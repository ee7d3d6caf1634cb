"""Adaptive-Blend and Adaptive-Patch: payload and cover samples, partial triggers at
training time, the full trigger at test time."""
import math

import pytest
import torch

from backdoorlab import attacks

NAMES = ["adaptive_blend", "adaptive_patch"]


def started(name, bundle, seed=0, **params):
    attack = attacks.create(name, **params)
    attack.prepare(bundle, seed=seed)
    attack.begin_training(None, bundle, None)
    return attack


def train_batch(attack, bundle, idx, poison):
    mask = torch.zeros(len(bundle.train_y), dtype=torch.bool)
    mask[poison] = True
    x, y = bundle.train_x[idx].float() / 255, bundle.train_y[idx]
    px, py = attack.training_batch(x, y, mask[idx], idx, bundle.num_classes)
    return x, y, px, py, mask[idx]


@pytest.mark.parametrize("name", NAMES)
def test_payload_gets_target_cover_keeps_label_clean_untouched(name, mnist):
    attack = started(name, mnist, target=3)
    poison = attack.poison_indices(mnist.train_y, 0.2, seed=0)
    idx = torch.arange(len(mnist.train_y))
    x, y, px, py, mask = train_batch(attack, mnist, idx, poison)
    cover = attack.roles(len(mnist.train_y))[0]
    assert torch.equal(px[~mask], x[~mask]) and torch.equal(py[~mask], y[~mask])
    assert ((px - x).abs().flatten(1).amax(1)[mask] > 0).all()  # every poisoned sample carries a trigger
    payload, kept = mask & ~cover, mask & cover
    assert (py[payload] == 3).all() and torch.equal(py[kept], y[kept])
    share = kept.sum().item() / mask.sum().item()
    assert abs(share - attack.cover_share) < 0.06  # per-index Bernoulli (0.5 and 2/3 by default)
    assert (y[kept] != 3).any()  # cover samples of other classes keep their (non-target) label


@pytest.mark.parametrize("name", NAMES)
def test_roles_are_seeded_and_keyed_by_dataset_index(name, mnist):
    a, b, c = (started(name, mnist, seed=s) for s in (0, 0, 1))
    n = len(mnist.train_y)
    assert all(torch.equal(u, v) for u, v in zip(a.roles(n), b.roles(n)))
    assert not torch.equal(a.roles(n)[1], c.roles(n)[1])
    poison = a.poison_indices(mnist.train_y, 0.1, seed=0)
    idx = torch.arange(200)
    whole = train_batch(a, mnist, idx, poison)
    part = train_batch(a, mnist, idx[50:90].flip(0), poison)  # another batch composition and order
    assert torch.equal(part[2], whole[2][50:90].flip(0)) and torch.equal(part[3], whole[3][50:90].flip(0))


@pytest.mark.parametrize("name", NAMES)
def test_training_batch_needs_begin_training(name, mnist):
    attack = attacks.create(name)
    x, y = mnist.train_x[:4].float() / 255, mnist.train_y[:4]
    with pytest.raises(RuntimeError, match="begin_training"):
        attack.training_batch(x, y, torch.ones(4, dtype=torch.bool), torch.arange(4), 10)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_works_on_grey_and_colour_images(name, shape):
    attack = attacks.create(name)
    attack.validate(10, shape)
    x = torch.rand(5, *shape)
    out = attack.apply(x)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    keep = torch.zeros(5, attack.num_pieces(), dtype=torch.bool)
    keep[:, 0] = True
    assert attack.partial(x, keep).shape == x.shape


def test_adaptive_blend_test_trigger_is_the_full_pattern_at_test_alpha():
    attack = attacks.create("adaptive_blend")
    x = torch.rand(3, 3, 32, 32)
    pattern = (attack.apply(x) - 0.8 * x) / 0.2
    assert torch.allclose(pattern, pattern[:1].expand_as(pattern), atol=1e-5) and pattern.std() > 0.05
    assert "alpha=0.15" in repr(attack) and "test_alpha=0.2" in repr(attack) and "pieces=16" in repr(attack)


def test_adaptive_blend_training_trigger_is_half_the_pieces_at_alpha(mnist):
    attack = started("adaptive_blend", mnist)
    poison = attack.poison_indices(mnist.train_y, 0.1, seed=0)
    x, _, px, _, mask = train_batch(attack, mnist, poison[:20], poison)
    x, px = x.double(), px.double()
    t = attack.trigger(1, 28, 28, torch.device("cpu")).double()
    _, keep = attack.roles(len(mnist.train_y))
    grid = math.isqrt(attack.pieces)
    for i in range(len(x)):
        expected = torch.zeros(28, 28, dtype=torch.double)
        for p in torch.nonzero(keep[poison[i]]).flatten().tolist():
            r, c = divmod(p, grid)
            expected[r * 7:(r + 1) * 7, c * 7:(c + 1) * 7] = 0.15
        assert torch.allclose(px[i], x[i] + expected * (t[0] - x[i]), atol=1e-6)
    assert keep.sum(1).eq(8).all()


def test_adaptive_patch_training_carries_one_patch_at_its_opacity(mnist):
    attack = started("adaptive_patch", mnist)
    poison = attack.poison_indices(mnist.train_y, 0.1, seed=0)
    x, _, px, _, _ = train_batch(attack, mnist, poison, poison)
    support, pattern = attack.layout(1, 28, 28, torch.device("cpu"))
    assert support.sum(1).tolist() == [16.0] * 4  # four 4x4 patches at 28x28
    _, keep = attack.roles(len(mnist.train_y))
    which = keep[poison].float().argmax(1)
    assert keep[poison].sum(1).eq(1).all() and len(set(which.tolist())) == 4
    for i in range(0, len(x), 37):
        k = int(which[i])
        a = (support[k] * attack.opacities[k]).view(1, 28, 28)
        assert torch.allclose(px[i], x[i] + a * (pattern[0] - x[i]), atol=1e-6)


def test_adaptive_patch_test_trigger_is_every_patch_in_the_corners():
    attack = attacks.create("adaptive_patch", test_opacity=1.0)
    x = torch.full((2, 3, 32, 32), 0.5)
    changed = (attack.apply(x) != x).any(1)[0]
    for rows, cols in [(slice(27, 32), slice(27, 32)), (slice(0, 5), slice(0, 5)),
                       (slice(0, 5), slice(27, 32)), (slice(27, 32), slice(0, 5))]:
        assert changed[rows, cols].any()
    assert not changed[5:27, :].any() and not changed[:, 5:27].any()
    fewer = attacks.create("adaptive_patch", opacities=(0.5, 0.5))
    assert (fewer.apply(x) != x).any(1)[0, :5, 27:].sum() == 0  # only k = 2 patches


@pytest.mark.parametrize("name, kwargs, match", [
    ("adaptive_blend", {"alpha": 1.5}, r"alpha must be in \(0, 1\]"),
    ("adaptive_blend", {"alpha": 0}, r"alpha must be in \(0, 1\]"),
    ("adaptive_blend", {"test_alpha": -0.1}, r"test_alpha must be in \(0, 1\]"),
    ("adaptive_blend", {"pieces": 10}, "pieces must be a square number"),
    ("adaptive_blend", {"piece_ratio": 0}, r"piece_ratio must be in \(0, 1\]"),
    ("adaptive_blend", {"piece_ratio": 0.01}, "keeps no piece"),
    ("adaptive_blend", {"cover_share": 1.0}, r"cover_share must be in \[0, 1\)"),
    ("adaptive_blend", {"pattern": "kitty"}, "valid choices: flower, china"),
    ("adaptive_patch", {"opacities": (0.5,) * 5}, "opacities must be a sequence of 1..4"),
    ("adaptive_patch", {"opacities": (0.5, 1.2)}, r"opacities\[1\] must be in \(0, 1\]"),
    ("adaptive_patch", {"test_opacity": 2}, r"test_opacity must be in \(0, 1\]"),
    ("adaptive_patch", {"patches_per_sample": 5}, "patches_per_sample must be an integer in 1..4"),
    ("adaptive_patch", {"patch_size": 0}, "patch_size must be an integer in 1..16"),
    ("adaptive_patch", {"cover_share": -0.1}, r"cover_share must be in \[0, 1\)"),
])
def test_bad_parameters(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        attacks.create(name, **kwargs)


def test_dataset_constraints():
    with pytest.raises(ValueError, match="finer than the 4x4 image"):
        attacks.create("adaptive_blend", pieces=25).validate(10, (3, 4, 4))
    with pytest.raises(ValueError, match="overlap"):
        attacks.create("adaptive_patch", patch_size=16).validate(10, (1, 32, 20))
    for name in NAMES:
        with pytest.raises(ValueError, match="1- or 3-channel"):
            attacks.create(name).validate(10, (2, 32, 32))
