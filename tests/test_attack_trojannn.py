"""TrojanNN: neurons picked by connection weight in a clean surrogate, a trigger optimised
inside a procedurally drawn mask to excite them, cached in the zoo."""
import pytest
import torch

from backdoorlab import attacks, paths
from backdoorlab.attacks import trojannn as trojannn_module
from backdoorlab.attacks.surrogate import clean_surrogate


@pytest.fixture(scope="module")
def trojannn(smoke_data):
    attack = attacks.create("trojannn")
    attack.prepare(smoke_data, scale="smoke", seed=0)
    return attack


def test_masks_sit_in_the_bottom_right_corner():
    apple = attacks.create("trojannn").mask(32, 32)
    square = attacks.create("trojannn", mask_shape="square", mask_size=4).mask(32, 32)
    assert apple.shape == (1, 32, 32) and apple[:, :22].sum() == 0 and apple[:, :, :22].sum() == 0
    assert 40 <= apple.sum() <= 90  # an apple, not its 10x10 box
    assert square.sum() == 16 and square[0, 28:, 28:].all()
    assert attacks.create("trojannn").mask(28, 28)[:, :19].sum() == 0  # 9x9 box at 28x28


def test_neurons_are_the_most_connected_inputs_of_linear(trojannn, smoke_data):
    model = clean_surrogate(smoke_data, scale="smoke", seed=0)
    strength = model.linear.weight.abs().sum(0)
    assert set(trojannn._cache["neurons"].tolist()) == set(strength.topk(2).indices.tolist())


def test_optimised_trigger_excites_the_neurons_more_than_the_white_mask(trojannn, smoke_data):
    model = clean_surrogate(smoke_data, scale="smoke", seed=0)
    neurons, mask = trojannn._cache["neurons"], trojannn._cache["mask"]
    white = mask[None].float()
    with torch.no_grad():
        before = model.embed(model.normalize(white))[0, neurons]
        after = model.embed(model.normalize(trojannn._cache["trigger"][None]))[0, neurons]
    assert ((after - 100) ** 2).sum() < ((before - 100) ** 2).sum()
    assert torch.allclose(after, trojannn._cache["activation"], atol=1e-4)


def test_trigger_is_stamped_inside_the_mask_only(trojannn):
    x = torch.rand(4, 1, 28, 28)
    out = trojannn.apply(x)
    inside = trojannn._cache["mask"].bool().expand_as(x)
    assert torch.equal(out[~inside], x[~inside])
    assert torch.equal(out[inside], trojannn._cache["trigger"][None].expand_as(x)[inside])
    t = trojannn._cache["trigger"][trojannn._cache["mask"].bool()]
    assert t.min() >= 0.7 - 1e-6 and t.max() <= 1  # within eps 0.3 of the white mask


def test_apply_needs_prepare():
    with pytest.raises(RuntimeError, match="call prepare"):
        attacks.create("trojannn").apply(torch.zeros(1, 1, 28, 28))


def test_trigger_is_cached_in_the_zoo_and_shared_across_targets(trojannn, smoke_data, monkeypatch):
    def no_optimising(*args, **kwargs):
        raise AssertionError("the trigger should come from the zoo")

    monkeypatch.setattr(trojannn_module.TrojanNN, "_optimise", no_optimising)
    again = attacks.create("trojannn", target=5)  # the trigger does not depend on the target
    again.prepare(smoke_data, scale="smoke", seed=0)
    assert torch.equal(again._cache["trigger"], trojannn._cache["trigger"])
    assert list(paths.zoo_dir().glob("trojannn-trigger-mnist5k-s0-smoke-*"))


def test_three_channel_images_and_a_conv_layer(rgb_bundle):
    data = rgb_bundle()
    attack = attacks.create("trojannn", target=1, layer="layer4.1.conv2", num_neurons=3, mask_shape="square")
    attack.prepare(data, scale="smoke", seed=0)
    assert attack._cache["trigger"].shape == (3, 32, 32) and len(attack._cache["neurons"]) == 3
    out = attack.apply(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 3, 32, 32) and (out[..., :22, :] == 0).all()


def test_unknown_layer_lists_choices(smoke_data):
    with pytest.raises(ValueError, match="layer 'fc' is not a Linear/Conv2d.*valid choices: conv1, .*linear"):
        attacks.create("trojannn", layer="fc").prepare(smoke_data, scale="smoke", seed=0)


@pytest.mark.parametrize("kwargs, match", [
    ({"layer": ""}, "layer must be a module name"),
    ({"num_neurons": 0}, "num_neurons must be an integer >= 1"),
    ({"step_size": 0}, r"step_size must be in \(0, 1\]"),
    ({"eps": 0}, r"eps must be in \(0, 1\]"),
    ({"mask_shape": "pear"}, "unknown mask_shape 'pear'; valid choices: apple, square"),
    ({"mask_size": 2}, "mask_size must be an integer in 3..32"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attacks.create("trojannn", **kwargs)


def test_mask_larger_than_the_image():
    with pytest.raises(ValueError, match="8-pixel mask does not fit a 8x6 image"):
        attacks.create("trojannn", mask_size=32).validate(10, (1, 8, 6))
