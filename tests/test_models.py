import pytest
import torch

from backdoorlab import models


def test_preactresnet18_has_backdoorbench_layer_names():
    m = models.create("preactresnet18", num_classes=10, in_channels=3, width=64)
    names = {n for n, _ in m.named_modules()}
    expected = {"conv1", "layer1", "layer2", "layer3", "layer4", "linear", "avgpool",
                "layer1.0.bn1", "layer1.0.conv1", "layer1.0.bn2", "layer1.0.conv2",
                "layer2.0.shortcut", "layer2.0.shortcut.0", "layer4.1.conv1", "layer4.0.shortcut.0"}
    assert expected <= names
    assert "layer1.0.shortcut" not in names  # identity shortcut in the first stage
    # the paper network: 11.17 M parameters (BackdoorBench's PreActResNet18 for 10 classes)
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(11.17e6, rel=0.01)
    assert m.linear.in_features == 512 and m.conv1.out_channels == 64


@pytest.mark.parametrize("name", models.names())
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_models_forward_any_width_and_shape(name, shape):
    m = models.create(name, num_classes=7, in_channels=shape[0], width=4)
    out = m(torch.rand(2, *shape))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_width_scales_channels():
    small = models.create("preactresnet18", 10, 3, width=16)
    assert small.conv1.out_channels == 16 and small.linear.in_features == 128
    vgg = models.create("vgg19_bn", 10, 3, width=32)
    assert vgg.classifier.in_features == 256


def test_normalisation_lives_in_the_model():
    m = models.create("preactresnet18", 10, 1, width=4, mean=(0.5,), std=(0.25,))
    x = torch.full((1, 1, 4, 4), 0.75)
    assert torch.allclose(m.normalize(x), torch.ones_like(x))
    assert "input_mean" in m.state_dict()


@pytest.mark.parametrize("width", [0, -3, 2.5, True])
def test_bad_width_is_rejected(width):
    with pytest.raises(ValueError, match="width"):
        models.create("preactresnet18", 10, 3, width=width)


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="unknown model 'resnet99'.*preactresnet18.*vgg19_bn"):
        models.create("resnet99", 10)
