"""BTI-DBF(U): the benign-feature mask, the generator's bound and the defense's contract."""
import pytest
import torch

from backdoorlab import data, defenses
from backdoorlab.defenses.btidbf import TinyGenerator, benign_feature_mask, masked, train_generator
from tiny import tiny_bundle as bundle, tiny_model as tiny


def test_generator_starts_near_but_not_at_the_identity_and_stays_in_range():
    torch.manual_seed(0)
    gen = TinyGenerator(1)
    x = torch.rand(3, 1, 13, 13)
    out = gen(x)
    assert out.shape == x.shape and (out >= 0).all() and (out <= 1).all()
    assert 0 < torch.nn.functional.mse_loss(out, x) < 1e-3  # off the identity, where every gradient vanishes


def test_mask_is_in_unit_interval_with_the_feature_shape_and_model_untouched():
    model, b = tiny(), bundle()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask = benign_feature_mask(model, b, epochs=2, batch_size=8, generator=torch.Generator().manual_seed(0))
    feats = model.layer4(model.layer3(model.layer2(model.layer1(model.conv1(model.normalize(b.train_x[:1].float() / 255))))))
    assert mask.shape == feats.shape[1:]
    assert (mask >= 0).all() and (mask <= 1).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_masked_hook_multiplies_and_is_removed():
    model = tiny()
    x = torch.rand(2, 1, 12, 12)
    zero = torch.zeros(1)
    with masked(model, "layer4", zero):
        out = model(x)
    assert torch.allclose(out, model.linear.bias.expand_as(out))
    assert not torch.allclose(model(x), out)


def test_generator_training_respects_a_tight_image_bound_and_freezes_nothing():
    model, b = tiny(), bundle()
    mask = torch.full((model.linear.in_features, 2, 2), 0.5)
    gen = train_generator(model, b, mask, epochs=3, batch_size=8, generator=torch.Generator().manual_seed(0),
                          norm_bound=1e-3)
    x = b.train_x.float() / 255
    with torch.no_grad():
        assert torch.nn.functional.mse_loss(gen(x), x) < 5e-3
    assert all(p.requires_grad for p in model.parameters())


def test_a_seeded_generator_training_does_not_depend_on_the_global_random_state():
    model, b = tiny(), bundle()
    mask = torch.full((model.linear.in_features, 2, 2), 0.5)
    trained = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        gen = train_generator(model, b, mask, epochs=1, batch_size=8, generator=torch.Generator().manual_seed(0))
        trained.append(gen.state_dict())
    assert all(torch.equal(a, trained[1][k]) for k, a in trained[0].items())


def test_purify_returns_a_new_model_with_the_same_keys():
    model, b = tiny(), bundle()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = defenses.create("btidbf", n_rounds=1, mask_epochs=1, generator_epochs=1, unlearn_epochs=1).purify(
        model, b, scale="smoke", progress=False)
    assert out is not model and out.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("params,match", [({"n_rounds": 0}, ">= 1"), ({"mask_epochs": 0}, ">= 1"),
                                          ({"norm_bound": 0}, "> 0"), ({"generated_fraction": 1.0}, r"\[0, 1\)")])
def test_bad_hyperparameters(params, match):
    with pytest.raises(ValueError, match=match):
        defenses.create("btidbf", **params)


@pytest.mark.calibrated
def test_inversion_finds_the_badnets_target_on_the_smoke_model(smoke_data, badnets_result):
    from backdoorlab.defenses.btidbf import detected_target

    model = badnets_result.model
    clean = smoke_data.subset(data.clean_subset(smoke_data, 0.05, seed=0))
    g = torch.Generator().manual_seed(0)
    mask = benign_feature_mask(model, clean, epochs=20, batch_size=32, generator=g)
    gen = train_generator(model, clean, mask, epochs=30, batch_size=32, generator=g)
    # generator seeds 0-4 find class 0 on the `make test` smoke model, seed 5 finds class 5
    assert detected_target(model, clean, gen) == badnets_result.setting.target
