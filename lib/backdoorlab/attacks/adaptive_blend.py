"""Adaptive-Blend: a blended trigger cut into pieces, and cover samples that keep their label.

Paper: Qi, Xie, Li, Wang & Mittal, "Revisiting the Assumption of Latent Separability
for Backdoor Defenses", ICLR 2023. https://openreview.net/forum?id=_wSHsgrVali

Threat model: the attacker poisons a fraction of the training set and has no control
over training. Two ideas weaken the latent separation that defenses (spectral
signatures, activation clustering, SCAn, ...) rely on:

- *conservatism*: besides the payload samples (trigger + target label), some "cover"
  samples carry the trigger but keep their **true** label, which regularises how
  strongly the model may rely on the trigger;
- *asymmetric planting*: the blend pattern is cut into a grid of ``pieces``; every
  training sample (payload or cover) carries only a random subset of them
  (``piece_ratio`` of the pieces) at a low opacity ``alpha``; at test time the full
  pattern is blended at the higher ``test_alpha``.

How this maps onto the pipeline: ``pratio`` (the pipeline's, a fraction of the whole
training set) counts payload *and* cover samples: of the poisoned indices, a share
``cover_share`` are cover samples. The rule is per dataset index and seeded by the
``seed`` given to ``prepare``: index ``i`` is a cover sample iff it is poisoned and
``u_i < cover_share`` (``u`` uniform, drawn once per training set), and it carries the
pieces of row ``i`` of a seeded ``bool[N, pieces]`` mask with exactly
``round(piece_ratio * pieces)`` pieces per row. Both are built once in
``begin_training`` and gathered by index in ``training_batch`` (no loop over samples).
``apply`` and ``poison_batch`` (test time, and defenses) use the full pattern.

Hyperparameters (paper defaults, CIFAR-10): poison rate 0.003 and cover rate 0.003
(so ``cover_share=0.5``; the paper's rates are tiny, here the pipeline's ``pratio``
governs, 0.1 by default), ``pieces=16`` (a 4x4 grid), ``piece_ratio=0.5`` (8 of the 16
pieces), ``alpha=0.15`` at training, ``test_alpha=0.2``. The paper blends a Hello-Kitty
image; we use a photo scikit-learn ships (``"flower"``), as Blended does. Target 0,
all-to-one.

>>> attack = AdaptiveBlend(alpha=0.15, test_alpha=0.2, pieces=16)
>>> poisoned = attack.apply(images)          # test time: the full pattern at test_alpha
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import register
from .base import Attack
from .patterns import NATURAL_IMAGES, natural_image

_ROLE_SALT = 0x5EED  # separates the role stream from the poison-index stream of the same seed


def _fraction(name: str, value: Any, low_open: bool = False, high_open: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = ok and (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


class AdaptiveMixin:
    """Payload/cover split and per-sample piece subsets for the adaptive attacks.

    A subclass defines ``cover_share``, ``num_pieces()``, ``kept_pieces()`` and
    ``partial(x, keep)`` (the training-time trigger with the pieces ``keep: bool[B, P]``).
    """

    cover_share: float
    _seed: int = 0

    def num_pieces(self) -> int:
        raise NotImplementedError

    def kept_pieces(self) -> int:
        raise NotImplementedError

    def partial(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, data: Any, *, scale: Any = None, seed: int = 0, progress: bool = False) -> None:
        self._seed = int(seed)

    def roles(self, n: int, device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``(cover bool[n], keep bool[n, pieces])`` for a training set of ``n`` samples:
        seeded on the CPU (same on every device), then moved to ``device``."""
        def build() -> tuple[torch.Tensor, torch.Tensor]:
            g = torch.Generator().manual_seed(self._seed * 1_000_003 + _ROLE_SALT)
            cover = torch.rand(n, generator=g) < self.cover_share
            order = torch.rand(n, self.num_pieces(), generator=g).argsort(1)
            keep = torch.zeros(n, self.num_pieces(), dtype=torch.bool)
            keep.scatter_(1, order[:, :self.kept_pieces()], True)
            return cover.to(device), keep.to(device)

        return self.cached(("roles", n, self._seed, torch.device(device)), build)  # type: ignore[attr-defined]

    def begin_training(self, model: nn.Module, data: Any, recipe: Any) -> None:
        self._roles = self.roles(len(data.train_y), data.device)

    def training_batch(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor,
                       num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Payload samples: partial trigger + target label; cover samples: partial
        trigger + true label; the rest untouched."""
        roles = getattr(self, "_roles", None)
        if roles is None:
            raise RuntimeError(f"{type(self).__name__}: call begin_training(model, data, recipe) before "
                               "training_batch (train.fit does)")
        cover, keep = roles
        x = torch.where(mask.view(-1, 1, 1, 1), self.partial(x, keep[idx]), x)
        payload = mask & ~cover[idx]
        y = torch.where(payload, self.target_labels(y, num_classes), y)  # type: ignore[attr-defined]
        return x, y


@register("adaptive_blend")
@dataclass
class AdaptiveBlend(AdaptiveMixin, Attack):
    alpha: float = 0.15  # blend opacity at training time, (0, 1]
    test_alpha: float = 0.2  # blend opacity of the full pattern at test time, (0, 1]
    pieces: int = 16  # pieces of the pattern: a square grid (4, 9, 16, ...)
    piece_ratio: float = 0.5  # share of the pieces a training sample carries, (0, 1]
    cover_share: float = 0.5  # share of the poisoned samples that keep their true label, [0, 1)
    pattern: str = "flower"

    name = "adaptive_blend"

    def __post_init__(self) -> None:
        super().__post_init__()
        _fraction("alpha", self.alpha, low_open=True)
        _fraction("test_alpha", self.test_alpha, low_open=True)
        _fraction("piece_ratio", self.piece_ratio, low_open=True)
        _fraction("cover_share", self.cover_share, high_open=True)
        if (isinstance(self.pieces, bool) or not isinstance(self.pieces, int) or self.pieces < 1
                or math.isqrt(self.pieces) ** 2 != self.pieces):
            raise ValueError(f"pieces must be a square number >= 1 (a grid: 1, 4, 9, 16, ...), got {self.pieces!r}")
        if self.kept_pieces() < 1:
            raise ValueError(f"piece_ratio {self.piece_ratio} keeps no piece of {self.pieces}; "
                             f"use piece_ratio >= {0.5 / self.pieces:.3g}")
        if self.pattern not in NATURAL_IMAGES:
            raise ValueError(f"unknown pattern {self.pattern!r}; valid choices: {', '.join(NATURAL_IMAGES)}")

    def validate(self, num_classes: int, shape: tuple[int, int, int] | None = None) -> None:
        super().validate(num_classes, shape)
        if shape is not None:
            c, h, w = shape
            if c not in (1, 3):
                raise ValueError(f"adaptive_blend supports 1- or 3-channel images, got {c} channels")
            grid = math.isqrt(self.pieces)
            if grid > min(h, w):
                raise ValueError(f"pieces={self.pieces} is a {grid}x{grid} grid, finer than the {h}x{w} image; "
                                 f"use at most {min(h, w) ** 2} pieces")

    def num_pieces(self) -> int:
        return self.pieces

    def kept_pieces(self) -> int:
        return round(self.piece_ratio * self.pieces)

    def trigger(self, channels: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        key = ("pattern", channels, height, width, device)
        return self.cached(key, lambda: natural_image(self.pattern, channels, height, width).to(device)[None])

    def piece_map(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """``long[H * W]``: the grid piece (row-major) each pixel belongs to."""
        def build() -> torch.Tensor:
            grid = math.isqrt(self.pieces)
            rows = torch.arange(height) * grid // height
            cols = torch.arange(width) * grid // width
            return (rows[:, None] * grid + cols[None, :]).flatten().to(device)

        return self.cached(("pieces", height, width, device), build)

    def partial(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Training-time trigger: the kept pieces of the pattern at ``alpha``."""
        b, c, h, w = x.shape
        m = keep[:, self.piece_map(h, w, x.device)].view(b, 1, h, w).to(x.dtype) * self.alpha
        t = self.trigger(c, h, w, x.device).to(x.dtype)
        return (x + m * (t - x)).clamp(0, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        t = self.trigger(x.shape[1], x.shape[2], x.shape[3], x.device).to(x.dtype)
        return ((1 - self.test_alpha) * x + self.test_alpha * t).clamp(0, 1)
