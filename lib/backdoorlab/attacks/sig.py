"""SIG: a horizontal sinusoidal signal added to target-class images (clean-label).

Paper: Barni, Kallas & Tondi, "A new backdoor attack in CNNs by training set corruption
without label poisoning", ICIP 2019. https://arxiv.org/abs/1902.11237

Threat model: clean-label. The attacker adds the signal to a fraction ``pratio`` of the
training set drawn only from the target class and leaves every label untouched (it
needs no control over labels or training); at test time it adds the same signal to an
image of another class.

Kernel: ``x' = clamp(x + delta / 255 * sin(2 pi j f / m))`` with ``j`` the column index
and ``m`` the image width: the same ramp on every row and channel.

Hyperparameters (BackdoorBench defaults, ``config/attack/sig/default.yaml``): ``delta`` 40
(amplitude on the 0..255 scale), ``f`` 6 (periods across the width); target 0,
all-to-one only, pratio 0.1 of the whole training set (on CIFAR-10: every target-class
image). BackdoorBench rounds poisoned images to uint8; here they stay float.

>>> attack = SIG(delta=40, f=6)
>>> poisoned = attack.apply(images)          # float[B, C, H, W] in [0, 1]
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch

from . import register
from .base import Attack


@register("sig")
@dataclass
class SIG(Attack):
    delta: float = 40  # amplitude, 0..255 scale
    f: float = 6  # number of periods across the image width

    name = "sig"
    clean_label = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.delta, bool) or not isinstance(self.delta, Real) or not 0 < self.delta <= 255:
            raise ValueError(f"delta must be in (0, 255] (amplitude on the 0..255 scale), got {self.delta!r}")
        if isinstance(self.f, bool) or not isinstance(self.f, Real) or not self.f > 0:
            raise ValueError(f"f must be a number of periods > 0, got {self.f!r}")

    def validate(self, num_classes: int, shape: tuple[int, int, int] | None = None) -> None:
        super().validate(num_classes, shape)
        if shape is not None and not self.f < shape[2] / 2:
            raise ValueError(f"f must be below half the image width (the Nyquist limit, {shape[2] / 2:g} "
                             f"periods for width {shape[2]}), got {self.f}")

    def pattern(self, width: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``float[1, 1, 1, W]``: the signal along the width (broadcast over rows and channels)."""

        def build() -> torch.Tensor:
            j = torch.arange(width, dtype=torch.float64)
            return (self.delta / 255.0 * torch.sin(2 * math.pi * j * self.f / width)).view(1, 1, 1, width)

        return self.cached(("pattern", width, device, dtype), lambda: build().to(device, dtype))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.pattern(x.shape[-1], x.device, x.dtype)).clamp(0, 1)
