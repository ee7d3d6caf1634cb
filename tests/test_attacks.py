"""Registry-wide attack tests: every registered attack is checked automatically."""
import pytest
import torch

from backdoorlab import attacks

ALL = attacks.names()
MNIST = (1, 28, 28)


def on_mnist(name, **params):
    """The attack with its defaults, adapted to one-channel mnist5k (FTrojan/CTRL: the luma variant)."""
    return attacks.create(name, **{**attacks.params_for(name, MNIST), **params})


@pytest.fixture(scope="module")
def batch(mnist):
    return mnist.train_x[:64].float() / 255, mnist.train_y[:64]


@pytest.fixture(scope="module")
def prepared(smoke_data):
    """Every attack with its defaults, prepared on the smoke data (``apply`` works after ``prepare``)."""
    made = {}

    def get(name, **params):
        key = (name, tuple(sorted(params.items())))
        if key not in made:
            attack = on_mnist(name, **params)
            attack.prepare(smoke_data, scale="smoke", seed=0)
            made[key] = attack
        return made[key]

    return get


@pytest.mark.parametrize("name", ALL)
def test_apply_keeps_shape_dtype_range_and_changes_images(name, batch, prepared):
    x, _ = batch
    attack = prepared(name)
    out = attack.apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().flatten(1).amax(1).min() > 0  # every image carries the trigger


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_poisoned_batch(name, batch, smoke_data):
    x, y = batch
    outs = []
    for _ in range(2):
        attack = on_mnist(name)
        attack.prepare(smoke_data, scale="smoke", seed=0)
        mask = torch.zeros(len(y), dtype=torch.bool)
        mask[attack.poison_indices(y, 0.1 if attack.clean_label else 0.25, seed=0)] = True
        outs.append(attack.poison_batch(x, y, mask, 10))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("name", ALL)
def test_apply_is_one_batched_kernel(name, batch, prepared):
    """Poisoning a batch equals poisoning each image alone (no cross-sample leakage)."""
    x, _ = batch
    attack = prepared(name)
    whole = attack.apply(x[:8])
    single = torch.cat([attack.apply(x[i:i + 1]) for i in range(8)])
    assert torch.allclose(whole, single, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_poison_indices_are_seeded_and_match_pratio(name, mnist):
    attack = attacks.create(name)
    pratio = 0.05  # clean-label: half of the target class (0.1 would be all of it on mnist5k)
    a = attack.poison_indices(mnist.train_y, pratio, seed=0)
    assert torch.equal(a, attack.poison_indices(mnist.train_y, pratio, seed=0))
    assert not torch.equal(a, attack.poison_indices(mnist.train_y, pratio, seed=1))
    assert len(a) == int(pratio * len(mnist.train_y)) and len(set(a.tolist())) == len(a)
    if attack.clean_label:
        assert (mnist.train_y[a] == attack.target).all()
    else:  # dirty-label: drawn from every class, the target class included (BackdoorBench)
        assert len(set(mnist.train_y[a].tolist())) == 10


@pytest.mark.parametrize("name", ALL)
def test_poison_batch_touches_only_masked_samples(name, batch, prepared):
    x, y = batch
    attack = prepared(name, target=3)
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[::4] = True
    px, py = attack.poison_batch(x, y, mask, 10)
    assert torch.equal(px[~mask], x[~mask]) and torch.equal(py[~mask], y[~mask])
    assert torch.allclose(px[mask], attack.apply(x[mask]))
    assert (py[mask] == 3).all() or attack.clean_label


@pytest.mark.parametrize("name", ALL)
def test_all_to_all_labels_and_test_set(name):
    y = torch.arange(10)
    if attacks.ATTACKS.get(name).clean_label:
        with pytest.raises(ValueError, match="clean-label attack: only label_mode='all2one'"):
            attacks.create(name, label_mode="all2all")
    else:
        attack = attacks.create(name, label_mode="all2all")
        assert attack.target_labels(y, 10).tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
        assert attack.test_mask(y).all()
    one = attacks.create(name, target=4)
    assert one.test_mask(y).tolist() == [i != 4 for i in range(10)]


def test_badnets_is_a_white_3x3_patch_bottom_right():
    x = torch.zeros(2, 3, 32, 32)
    out = attacks.create("badnets").apply(x)
    assert (out[..., 29:, 29:] == 1).all() and out.sum() == 2 * 3 * 9
    assert (attacks.create("badnets").apply(torch.zeros(1, 1, 64, 64))[..., 58:, 58:] == 1).all()  # 6x6 at 64


def test_blended_is_an_alpha_blend_with_a_natural_image():
    attack = attacks.create("blended", alpha=0.2)
    x = torch.rand(3, 3, 32, 32)
    out = attack.apply(x)
    pattern = (out - 0.8 * x) / 0.2
    assert torch.allclose(pattern, pattern[:1].expand_as(pattern), atol=1e-5)  # same pattern for all
    assert pattern.std() > 0.05  # a real picture, not a constant
    assert "alpha=0.2" in repr(attack) and "pattern='flower'" in repr(attack)


@pytest.mark.parametrize("kwargs, match", [
    ({"label_mode": "one2one"}, "label_mode must be one of all2one, all2all"),
    ({"target": -1}, "target"),
])
def test_bad_attack_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attacks.create("badnets", **kwargs)


def test_unknown_attack_parameter_lists_valid_ones():
    with pytest.raises(TypeError, match="unknown parameter.*alpah.*valid parameters: target, label_mode, alpha, pattern"):
        attacks.create("blended", alpah=0.3)


def test_clean_label_pratio_beyond_the_target_class(mnist):
    clean_label = [n for n in ALL if attacks.ATTACKS.get(n).clean_label]
    for name in clean_label:
        with pytest.raises(ValueError, match="only 400 are eligible"):
            attacks.create(name).poison_indices(mnist.train_y, 0.2)


@pytest.mark.parametrize("pratio", [0, -0.1, 1.5, "0.1"])
def test_pratio_outside_unit_interval(pratio, mnist):
    with pytest.raises(ValueError, match=r"pratio must be in \(0, 1\]"):
        attacks.create("badnets").poison_indices(mnist.train_y, pratio)


def test_target_outside_classes():
    with pytest.raises(ValueError, match="target label 10 is outside the dataset's classes 0..9"):
        attacks.create("badnets", target=10).validate(10)


@pytest.mark.parametrize("name", ALL)
def test_one_epoch_of_fit_on_colour_images(name, rgb_bundle, tmp_path, monkeypatch):
    """Every attack prepares, drives train.fit (its hooks) and applies its trigger on 3x32x32 data."""
    from backdoorlab import models, train

    monkeypatch.setenv("BACKDOORLAB_RUNS", str(tmp_path))
    bundle = rgb_bundle(n=64, classes=10)
    attack = attacks.create(name)
    attack.validate(10, bundle.shape)
    attack.prepare(bundle, scale="smoke", seed=0)
    model = models.for_bundle("preactresnet18", bundle, width=2)
    history = train.fit(model, bundle, train.Recipe(epochs=1, batch_size=16), attack,
                        attack.poison_indices(bundle.train_y, 0.1), progress=False)
    assert len(history.loss) == 1 and torch.isfinite(torch.tensor(history.loss[0]))
    out = attack.apply(bundle.test_x[:4].float() / 255)
    assert out.shape == (4, 3, 32, 32) and out.min() >= 0 and out.max() <= 1


def test_params_for_adds_the_smoke_setting_only_at_smoke():
    assert attacks.params_for("wanet", MNIST) == attacks.params_for("wanet", MNIST, "default") == {}
    assert attacks.params_for("wanet", MNIST, "smoke") == {"s": 2.0, "cross_ratio": 0.0}
    assert attacks.params_for("ftrojan", MNIST, "smoke") == {"channels": (0,), "magnitude": 255}
    assert attacks.params_for("ftrojan", (3, 32, 32), "paper") == {}
    assert attacks.params_for("badnets", MNIST, "smoke") == {}
    with pytest.raises(ValueError, match="valid choices: smoke, default, paper"):
        attacks.params_for("wanet", MNIST, "tiny")
