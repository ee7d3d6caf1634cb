"""BadNets: a small white patch stamped on the image.

Paper: Gu, Dolan-Gavitt & Garg, "BadNets: Identifying Vulnerabilities in the Machine
Learning Model Supply Chain", 2017. https://arxiv.org/abs/1708.06733

Threat model: the attacker poisons a fraction ``pratio`` of the training set (image
stamped, label set to the target) and has no control over training.

Hyperparameters (BackdoorBench defaults): a 3x3 white square in the bottom-right
corner of a 32x32 image (rows/cols 29-31), scaled with the resolution (3x3 on
28x28 MNIST, 6x6 on 64x64 Tiny-ImageNet); target 0, all-to-one, pratio 0.1.

>>> attack = BadNets(patch_size=3)
>>> poisoned = attack.apply(images)          # float[B, C, H, W] in [0, 1]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register
from .base import Attack


@register("badnets")
@dataclass
class BadNets(Attack):
    patch_size: int = 3  # side of the square at 32x32 resolution
    value: float = 1.0  # patch intensity (1 = white)

    name = "badnets"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.patch_size, int) or not 1 <= self.patch_size <= 32:
            raise ValueError(f"patch_size must be an integer in 1..32, got {self.patch_size!r}")
        if not 0 <= self.value <= 1:
            raise ValueError(f"value must be in [0, 1], got {self.value}")

    def mask(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """``float[1, 1, H, W]``: 1 inside the patch, 0 elsewhere."""

        def build() -> torch.Tensor:
            side = max(1, round(self.patch_size * height / 32))
            m = torch.zeros(1, 1, height, width, device=device)
            m[..., height - side:, width - side:] = 1.0
            return m

        return self.cached(("mask", height, width, device), build)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask(x.shape[-2], x.shape[-1], x.device).to(x.dtype)
        return x * (1 - m) + self.value * m
