"""Bad input stops with a clear error naming the valid choices, before any data is
loaded or any model trained."""
import pytest

from backdoorlab import data, pipeline
from backdoorlab.pipeline import Setting


@pytest.fixture(autouse=True)
def no_compute(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("compute started before the input was validated")

    monkeypatch.setattr(pipeline, "fit", forbidden)
    monkeypatch.setattr(pipeline, "load_data", forbidden)
    monkeypatch.setattr(data, "load", forbidden)


@pytest.mark.parametrize("change, error, match", [
    ({"dataset": "imagenet22k"}, ValueError, "unknown dataset 'imagenet22k'; valid choices: cifar10, cifar100, gtsrb, mnist5k, tiny-imagenet"),
    ({"model": "resnet1001"}, ValueError, "unknown model 'resnet1001'; valid choices: preactresnet18, vgg19_bn"),
    ({"attack": "badnet"}, ValueError, "unknown attack 'badnet'; valid choices: adaptive_blend, adaptive_patch, badnets, bl"),
    ({"pratio": 0.0}, ValueError, r"pratio must be in \(0, 1\]"),
    ({"pratio": 1.01}, ValueError, r"pratio must be in \(0, 1\]"),
    ({"target": 10}, ValueError, r"target label 10 is outside the dataset's classes 0..9"),
    ({"target": 43, "dataset": "gtsrb"}, ValueError, r"target label 43 is outside the dataset's classes 0..42"),
    ({"width": 0}, ValueError, "width must be an integer >= 1"),
    ({"scale": "huge"}, ValueError, "unknown scale 'huge'; valid choices: smoke, default, paper"),
    ({"attack_params": {"alpha": 0.2}}, TypeError, "unknown parameter.*alpha.*valid parameters: target, label_mode, patch_size, value"),
])
def test_bad_setting_fails_before_compute(change, error, match):
    setting = Setting(**{"scale": "smoke", **change})
    with pytest.raises(error, match=match):
        pipeline.train_attack(setting)


def test_unknown_defense_lists_choices():
    from backdoorlab import defenses

    with pytest.raises(ValueError, match="unknown defense 'fine-tune'; valid choices: abl, anp, .*ft, "):
        defenses.create("fine-tune")
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        defenses.create("ft", epochs=0)


def test_unknown_defense_or_detector_fails_before_training():
    with pytest.raises(ValueError, match="unknown defense 'nad2'; valid choices: abl, "):
        pipeline.defend(result=None, defense="nad2")  # checked before the result is touched
    with pytest.raises(ValueError, match="unknown detector 'activation'; valid choices: ac, spectral, strip"):
        pipeline.detect(result=None, detector="activation")


def test_bad_defense_and_detector_parameters_name_the_valid_range():
    from backdoorlab import defenses, detectors

    with pytest.raises(ValueError, match=r"anp_eps must be in \[0, 1\]"):
        defenses.create("anp", anp_eps=2)
    with pytest.raises(ValueError, match=r"isolation_ratio must be in \(0, 1\)"):
        defenses.create("abl", isolation_ratio=1.5)
    with pytest.raises(TypeError, match="unknown parameter.*lamda.*valid parameters: "):
        defenses.create("nc", lamda=0.1)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        detectors.create("strip", alpha=1.5)
