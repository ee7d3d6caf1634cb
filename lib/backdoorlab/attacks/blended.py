"""Blended: the whole image is alpha-blended with a fixed natural picture.

Paper: Chen, Liu, Li, Lu & Song, "Targeted Backdoor Attacks on Deep Learning Systems
Using Data Poisoning", 2017. https://arxiv.org/abs/1712.05526

Threat model: the attacker poisons a fraction ``pratio`` of the training set
(``x' = (1 - alpha) x + alpha t``, label set to the target); no control over training.

Hyperparameters (BackdoorBench defaults): alpha 0.2 at training and test time;
BackdoorBench blends a Hello-Kitty photo, which we cannot ship: the pattern here is a
photo that scikit-learn ships (``"flower"`` by default, or ``"china"``), resized to
the dataset's resolution (grey for one-channel data). Target 0, all-to-one, pratio 0.1.

>>> attack = Blended(alpha=0.2)
>>> poisoned = attack.apply(images)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register
from .base import Attack
from .patterns import NATURAL_IMAGES, natural_image


@register("blended")
@dataclass
class Blended(Attack):
    alpha: float = 0.2
    pattern: str = "flower"

    name = "blended"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if self.pattern not in NATURAL_IMAGES:
            raise ValueError(f"unknown pattern {self.pattern!r}; valid choices: {', '.join(NATURAL_IMAGES)}")

    def trigger(self, channels: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        key = ("pattern", channels, height, width, device)
        return self.cached(key, lambda: natural_image(self.pattern, channels, height, width).to(device)[None])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        t = self.trigger(x.shape[1], x.shape[2], x.shape[3], x.device).to(x.dtype)
        return (1 - self.alpha) * x + self.alpha * t
