"""VGG19-BN (Simonyan & Zisserman, ICLR 2015) for small images: the 16 conv+BN+ReLU
layers of configuration E, a global average pool and one linear classifier.
Pools use ``ceil_mode`` so 28x28 inputs work as well as 32x32. ``width`` scales the
channels (64 = the paper's network)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import ImageClassifier, scaled

VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


class VGG19BN(ImageClassifier):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)):
        super().__init__(mean, std)
        layers: list[nn.Module] = []
        channels = in_channels
        for v in VGG19:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                out = scaled(int(v), width)
                layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(channels, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(z)
