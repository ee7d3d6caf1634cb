"""Refool: natural reflections as the trigger.

Paper: Liu, Ma, Bailey & Lu, "Reflection Backdoor: A Natural Backdoor Attack on Deep
Neural Networks", ECCV 2020. https://arxiv.org/abs/2007.02343

Threat model: the attacker poisons a fraction ``pratio`` of the training set by adding a
reflection of another scene to each poisoned image (BackdoorBench default: dirty-label,
label set to the target; ``clean_label=True``: target-class images only, labels kept) and
has no control over training; at test time it adds reflections to other images.

Kernel (the paper's reflection models, in linear light: images raised to the power 2.2
and back): each poisoned image ``t`` gets one reflection layer ``r`` from a bank, either
- ghost effect (with probability ``ghost_rate``): ``r`` plus a copy shifted by ``offset``,
  ``g = a r + (1 - a) shift(r)``; ``x' = (1 - alpha_t) g + alpha_t t``;
- out-of-focus reflection: ``r`` blurred by a Gaussian of width ``sigma``, dimmed where
  ``r + t`` would over-expose, weighted by a centred Gaussian vignette times
  ``1 - alpha_t / 2``: ``x' = vignette * r_blur + alpha_t t``.
The bank holds ``reflections`` crops of the photos that scikit-learn ships ("china",
"flower"; grey on one-channel data), each with its own model and random parameters drawn
by a generator seeded in ``prepare`` (the run's seed). Which reflection an image gets is a
hash of its pixels (rounded to 0..255): deterministic, a function of the image alone, so
a batch equals its images poisoned one by one, and the kernel is one gather + a few ops.

Hyperparameters (BackdoorBench defaults, ``config/attack/refool/default.yaml``):
``ghost_rate`` 0.49, ``alpha_t`` 0.4 (weight of the clean image), ``offset`` (0, 0) (= a
random 3..8 pixel shift per reflection), ``sigma`` -1 (= random in [1, 5] pixels),
``ghost_alpha`` -1 (= random in [0.15, 0.5] or [0.5, 0.85]), ``clean_label`` False; target
0, all-to-one, pratio 0.1. BackdoorBench draws one of Refool's adversarially selected
reflection photos (``resource/refool``) at random per image; we cannot ship them, hence
the bank (``reflections`` 16, not a BackdoorBench parameter) of bundled-photo crops.

>>> attack = Refool(alpha_t=0.4)
>>> attack.prepare(bundle, seed=0)
>>> poisoned = attack.apply(images)          # float[B, C, H, W] in [0, 1]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import register
from .base import Attack
from .patterns import NATURAL_IMAGES

GAMMA = 2.2


def _number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _photo_crop(g: torch.Generator, c: int, h: int, w: int) -> torch.Tensor:
    """A random crop of a bundled photo, resized to ``[c, h, w]`` in [0, 1]."""
    from sklearn.datasets import load_sample_image

    name = NATURAL_IMAGES[int(torch.randint(len(NATURAL_IMAGES), (), generator=g))]
    photo = torch.from_numpy(np.asarray(load_sample_image(f"{name}.jpg"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    ph, pw = photo.shape[1:]
    side = int(_uniform(g, 0.3, 0.7) * min(ph, pw))
    ch, cw = side, min(pw, max(1, round(side * w / h)))
    top = int(torch.randint(ph - ch + 1, (), generator=g))
    left = int(torch.randint(pw - cw + 1, (), generator=g))
    crop = F.interpolate(photo[None, :, top:top + ch, left:left + cw], size=(h, w), mode="bilinear",
                         antialias=True, align_corners=False)[0]
    if c == 1:
        crop = (0.299 * crop[0] + 0.587 * crop[1] + 0.114 * crop[2])[None]
    return crop.clamp(0, 1)


def _ghost(r: torch.Tensor, dy: int, dx: int, a: float) -> torch.Tensor:
    """The reflection and its copy shifted by (dy, dx), mixed and resized back."""
    h, w = r.shape[1:]
    mix = a * r[:, dy:, dx:] + (1 - a) * r[:, :h - dy, :w - dx]
    return F.interpolate(mix[None], size=(h, w), mode="bilinear", align_corners=False)[0]


def _blur(r: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = math.ceil(2 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(r.dtype)
    c = r.shape[0]
    x = F.pad(r[None], (radius,) * 4, mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)[0]


def _vignette(h: int, w: int) -> torch.Tensor:
    """A centred Gaussian bump, 1 at the centre, ~0.1 at the edges' middles."""
    u = torch.linspace(-3, 3, max(h, w))
    m = torch.exp(-(u[:h, None] ** 2 + u[None, :w] ** 2) / 4)
    return m / m.max()


@register("refool")
@dataclass
class Refool(Attack):
    alpha_t: float = 0.4  # weight of the clean (transmission) image, in (0, 1)
    ghost_rate: float = 0.49  # probability of the ghost model (else: out-of-focus blur)
    offset: tuple = (0, 0)  # ghost shift (rows, cols) in pixels; (0, 0) = random 3..8
    sigma: float = -1  # blur width in pixels; < 0 = random in [1, 5]
    ghost_alpha: float = -1  # ghost mix in [0, 1]; < 0 = random
    reflections: int = 16  # reflection photos in the bank
    clean_label: bool = False

    name = "refool"
    _seed: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.clean_label, bool):
            raise ValueError(f"clean_label must be True or False, got {self.clean_label!r}")
        super().__post_init__()
        if isinstance(self.offset, list):
            self.offset = tuple(self.offset)
        if not _number(self.alpha_t) or not 0 < self.alpha_t < 1:
            raise ValueError(f"alpha_t must be in (0, 1) (the clean image's weight), got {self.alpha_t!r}")
        if not _number(self.ghost_rate) or not 0 <= self.ghost_rate <= 1:
            raise ValueError(f"ghost_rate must be in [0, 1], got {self.ghost_rate!r}")
        if not (isinstance(self.offset, tuple) and len(self.offset) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in self.offset)):
            raise ValueError(f"offset must be two integers >= 0 (pixels; (0, 0) = random 3..8), got {self.offset!r}")
        if not _number(self.sigma) or self.sigma == 0:
            raise ValueError(f"sigma must be > 0 (pixels) or negative (random in [1, 5]), got {self.sigma!r}")
        if not _number(self.ghost_alpha) or self.ghost_alpha > 1:
            raise ValueError(f"ghost_alpha must be in [0, 1] or negative (random), got {self.ghost_alpha!r}")
        if isinstance(self.reflections, bool) or not isinstance(self.reflections, int) or not 1 <= self.reflections <= 1024:
            raise ValueError(f"reflections must be an integer in 1..1024, got {self.reflections!r}")

    def validate(self, num_classes: int, shape: tuple[int, int, int] | None = None) -> None:
        super().validate(num_classes, shape)
        if shape is not None:
            if shape[0] not in (1, 3):
                raise ValueError(f"refool needs RGB (3-channel) or grayscale (1-channel) images, got {shape[0]} channels")
            if min(shape[1:]) < 16 or self.offset[0] >= shape[1] or self.offset[1] >= shape[2]:
                raise ValueError(f"refool needs images of at least 16x16 and an offset inside the image, "
                                 f"got image {shape[1]}x{shape[2]} and offset {self.offset}")

    def prepare(self, data: Any, *, scale: Any = None, seed: int = 0, progress: bool = False) -> None:
        """Seed the reflection bank with the run's seed (built lazily per image shape)."""
        if seed != self._seed:
            self._seed = seed
            self._cache.clear()

    def bank(self, c: int, h: int, w: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The reflection layers ``[K, C, H, W]`` (linear light), their weights ``[K, 1, H, W]``,
        the over-exposure correction per reflection ``[K, 1, 1, 1]`` (0 for ghosts) and hash weights."""

        def build() -> dict[str, torch.Tensor]:
            g = torch.Generator().manual_seed(self._seed)
            vignette = _vignette(h, w)[None] * (1 - self.alpha_t / 2)
            layers, weights, adjust = [], [], []
            for _ in range(self.reflections):  # over the bank's photos, not the samples
                r = _photo_crop(g, c, h, w) ** GAMMA
                if _uniform(g, 0, 1) < self.ghost_rate:
                    dy, dx = self.offset if any(self.offset) else torch.randint(3, 9, (2,), generator=g).tolist()
                    a = self.ghost_alpha if self.ghost_alpha >= 0 else abs(
                        int(torch.randint(2, (), generator=g)) - _uniform(g, 0.15, 0.5))
                    layers.append(_ghost(r, dy, dx, a))
                    weights.append(torch.full((1, h, w), 1 - self.alpha_t))
                    adjust.append(0.0)
                else:
                    layers.append(_blur(r, self.sigma if self.sigma > 0 else _uniform(g, 1, 5)))
                    weights.append(vignette)
                    adjust.append(1.08 + _uniform(g, 0, 0.1))
            out = {"layer": torch.stack(layers), "weight": torch.stack(weights),
                   "adjust": torch.tensor(adjust).view(-1, 1, 1, 1),
                   "hash": torch.randint(1, 2 ** 16, (c * h * w,), generator=g)}
            return {k: v.to(device) for k, v in out.items()}

        return self.cached(("bank", c, h, w, device, self._seed), build)

    def choose(self, x: torch.Tensor, bank: dict[str, torch.Tensor]) -> torch.Tensor:
        """Which reflection each image gets: a hash of its pixels (exact integer arithmetic)."""
        q = (x.detach() * 255).round().to(torch.int64).flatten(1)
        return (q * bank["hash"]).sum(1) % self.reflections

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        bank = self.bank(x.shape[1], x.shape[2], x.shape[3], x.device)
        k = self.choose(x, bank)
        r = bank["layer"][k].to(x.dtype)
        t = x.clamp(0, 1) ** GAMMA
        blend = r + t
        over = (blend > 1).to(x.dtype)
        mean = (blend * over).sum((2, 3), keepdim=True) / (over.sum((2, 3), keepdim=True) + 1e-6)
        r = (r - bank["adjust"][k].to(x.dtype) * (mean.clamp(min=1) - 1)).clamp(0, 1)
        return (r * bank["weight"][k].to(x.dtype) + self.alpha_t * t).clamp(0, 1) ** (1 / GAMMA)
