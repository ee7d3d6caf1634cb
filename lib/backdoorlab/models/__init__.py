"""Models by name: ``models.create(name, num_classes, in_channels, width)``.

Every model takes images in [0, 1] and applies the dataset normalisation itself
(pass ``mean``/``std``, or use :func:`for_bundle`)."""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from ..registry import Registry
from .base import ImageClassifier
from .preact_resnet import PreActResNet18
from .vgg import VGG19BN

MODELS: Registry[ImageClassifier] = Registry("model")
MODELS.register("preactresnet18")(PreActResNet18)
MODELS.register("vgg19_bn")(VGG19BN)


def names() -> list[str]:
    return MODELS.names()


def check(name: str, width: int) -> str:
    MODELS.get(name)
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ValueError(f"model width must be an integer >= 1 (64 = the paper's network), got {width!r}")
    return name.lower()


def create(name: str, num_classes: int, in_channels: int = 3, width: int = 64,
           mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)) -> ImageClassifier:
    check(name, width)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return MODELS.create(name, num_classes=num_classes, in_channels=in_channels, width=width, mean=mean, std=std)


def for_bundle(name: str, bundle: Any, width: int = 64) -> ImageClassifier:
    """A model shaped for a dataset bundle, with its normalisation built in."""
    return create(name, bundle.num_classes, bundle.in_channels, width, bundle.mean, bundle.std)


def clone(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


__all__ = ["create", "for_bundle", "names", "check", "clone", "PreActResNet18", "VGG19BN", "ImageClassifier", "MODELS"]
