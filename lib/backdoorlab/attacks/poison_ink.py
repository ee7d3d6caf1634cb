"""Poison Ink: the image's own edges, coloured with a fixed ink and embedded faintly.

Paper: Zhang, Chen, Ou, Zhang, Zhou, Wang & Yu, "Poison Ink: Robust and Invisible
Backdoor Attack", IEEE Transactions on Image Processing 31, 2022.
https://arxiv.org/abs/2108.02488

Threat model: the attacker poisons a fraction ``pratio`` of the training set (trigger
embedded, label set to the target: dirty-label) and has no control over training.
The trigger is not a fixed pattern but the image's structure: it follows the content,
so it survives the crops and flips of data augmentation.

Kernel (batched, one image never influences another): grey image (ITU-R 601 luma) ->
3x3 binomial blur -> Sobel gradients -> Canny-style non-maximum suppression along the
gradient direction (quantised to 0/45/90/135 degrees) -> double threshold with one
step of hysteresis (weak edges next to strong ones) -> a binary edge map ``E`` ->
``x' = x + strength * E * (ink - x)``: the edges are coloured with the ink at
opacity ``strength``. On one-channel data the ink is its luma. The stencils are written as shifted
sums (a separable 3x3 convolution), not ``conv2d``: every image gives bit-identical
edges whether it is poisoned alone or in a batch, so thresholds never flip.

Simplification (documented deviation): the paper embeds the coloured edge image with a
trained injection network (a U-Net encoder with a reveal network, trained for
invisibility and robustness). Here the coloured edge map is added directly as a small
residual (``strength``); nothing is trained. Images without any edge are unchanged.

Hyperparameters (our defaults; the paper lets the attacker pick the ink): ink
``color=(0, 1, 0)`` (green, RGB in [0, 1]), ``strength=0.5`` (opacity on edge pixels),
``threshold=0.2`` (high Canny threshold on the gradient magnitude, normalised so a
black-to-white step gives 1; the low threshold is half of it). Target 0, all-to-one,
pratio 0.1 (BackdoorBench). ``strength`` is the price of the simplification: without
the paper's trained encoder the residual must be strong enough to be learnt, and on
``smoke`` training (4 epochs, 2,000 MNIST digits) opacities 0.2-0.4 were not learnt
(ASR < 0.1) while 0.5 was (ASR 0.92); the ink is then visible as a faint halo. Lower it
for stealth where training is longer.

>>> attack = PoisonInk(color=(0.0, 1.0, 0.0), strength=0.5)
>>> poisoned = attack.apply(images)          # float[B, C, H, W] in [0, 1]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import register
from .base import Attack

_TAN_22_5 = 0.41421356237309503  # tan(22.5 degrees): bounds of the quantised directions


def _pad(m: torch.Tensor, replicate: bool) -> torch.Tensor:
    """Pad the two leading (spatial) dims of ``[H, W, B]`` by one pixel: edge values or zeros."""
    if not replicate:
        return F.pad(m, (0, 0, 1, 1, 1, 1))
    h, w = m.shape[:2]
    rows = torch.arange(-1, h + 1, device=m.device).clamp_(0, h - 1)
    cols = torch.arange(-1, w + 1, device=m.device).clamp_(0, w - 1)
    return m[rows][:, cols]


def _smooth(p: torch.Tensor, dim: int) -> torch.Tensor:
    """[1, 2, 1] along ``dim`` of a padded map (length shrinks by 2)."""
    n = p.shape[dim]
    return p.narrow(dim, 0, n - 2) + p.narrow(dim, 1, n - 2) * 2 + p.narrow(dim, 2, n - 2)


def _diff(p: torch.Tensor, dim: int) -> torch.Tensor:
    """[-1, 0, 1] along ``dim`` of a padded map (length shrinks by 2)."""
    n = p.shape[dim]
    return p.narrow(dim, 2, n - 2) - p.narrow(dim, 0, n - 2)


def _any3(p: torch.Tensor, dim: int) -> torch.Tensor:
    n = p.shape[dim]
    return p.narrow(dim, 0, n - 2) | p.narrow(dim, 1, n - 2) | p.narrow(dim, 2, n - 2)


def canny_edges(grey: torch.Tensor, threshold: float, blur: bool = True) -> torch.Tensor:
    """Binary edge map ``float[B, 1, H, W]`` of grey images ``float[B, 1, H, W]`` in [0, 1].

    Internally the images are laid out ``[H, W, B]``: a shifted window is then a run of
    whole contiguous pixel vectors, which keeps the elementwise stencils fast on the CPU.
    """
    g = grey[:, 0].permute(1, 2, 0).contiguous()
    h, w = g.shape[:2]
    if blur:
        g = _smooth(_smooth(_pad(g, True), 0), 1) * 0.0625
    p = _pad(g, True)
    gx = _smooth(_diff(p, 1), 0) * 0.25  # Sobel, scaled so a unit step gives 1
    gy = _smooth(_diff(p, 0), 1) * 0.25
    mag = gx * gx + gy * gy  # squared magnitude: no sqrt, no atan2 (exact, batch-independent)
    ax, ay = gx.abs(), gy.abs()
    horizontal = ay <= ax * _TAN_22_5  # gradient along x: compare left/right neighbours
    vertical = (ax <= ay * _TAN_22_5) & ~horizontal
    diagonal = ~(horizontal | vertical)
    same_sign = (gx * gy) > 0  # down-right diagonal, else down-left
    mp = _pad(mag, False)

    def ridge(dy: int, dx: int) -> torch.Tensor:  # not smaller than both neighbours along (dy, dx)
        return (mag >= mp[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]) & (mag >= mp[1 - dy:1 - dy + h, 1 - dx:1 - dx + w])

    peak = ((horizontal & ridge(0, 1)) | (vertical & ridge(1, 0))
            | (diagonal & same_sign & ridge(1, 1)) | (diagonal & ~same_sign & ridge(1, -1)))
    strong = peak & (mag > threshold * threshold)
    weak = peak & (mag > threshold * threshold * 0.25)
    near_strong = _any3(_any3(_pad(strong, False), 0), 1)  # 3x3 dilation: one step of hysteresis
    edges = strong | (weak & near_strong)
    return edges.permute(2, 0, 1)[:, None].to(grey.dtype)


def luma(x: torch.Tensor) -> torch.Tensor:
    """Grey ``[B, 1, H, W]`` (ITU-R 601) of 3-channel images; 1-channel images as they are."""
    if x.shape[1] == 1:
        return x
    return x[:, 0:1] * 0.299 + x[:, 1:2] * 0.587 + x[:, 2:3] * 0.114


@register("poison_ink")
@dataclass
class PoisonInk(Attack):
    color: tuple = (0.0, 1.0, 0.0)  # ink colour, RGB in [0, 1] (its luma on one-channel data)
    strength: float = 0.5  # opacity of the ink on edge pixels, (0, 1]
    threshold: float = 0.2  # high Canny threshold on the normalised gradient magnitude, (0, 1]
    blur: bool = True  # 3x3 binomial blur before the gradients (Canny's smoothing)

    name = "poison_ink"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.color, (str, bytes)) or len(tuple(self.color)) != 3:
            raise ValueError(f"color must be an (R, G, B) triple with values in [0, 1], got {self.color!r}")
        self.color = tuple(float(c) for c in self.color)
        if not all(0 <= c <= 1 for c in self.color):
            raise ValueError(f"color values must be in [0, 1], got {self.color}")
        if isinstance(self.strength, bool) or not 0 < self.strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {self.strength!r}")
        if isinstance(self.threshold, bool) or not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1] (a unit black-to-white step has magnitude 1), "
                             f"got {self.threshold!r}")
        if not isinstance(self.blur, bool):
            raise ValueError(f"blur must be True or False, got {self.blur!r}")

    def validate(self, num_classes: int, shape: tuple[int, int, int] | None = None) -> None:
        super().validate(num_classes, shape)
        if shape is not None:
            c, h, w = shape
            if c not in (1, 3):
                raise ValueError(f"poison_ink supports 1- or 3-channel images, got {c} channels")
            if h < 3 or w < 3:
                raise ValueError(f"poison_ink needs images of at least 3x3 pixels for its edge detector, got {h}x{w}")

    def ink(self, channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The ink as ``[1, C, 1, 1]``: the colour, or its luma for one channel."""
        def build() -> torch.Tensor:
            rgb = torch.tensor(self.color)
            if channels == 1:
                rgb = (rgb * torch.tensor([0.299, 0.587, 0.114])).sum().view(1)
            elif channels != 3:
                raise ValueError(f"poison_ink supports 1- or 3-channel images, got {channels} channels")
            return rgb.view(1, channels, 1, 1).to(device)

        return self.cached(("ink", channels, device), build).to(dtype)

    def edges(self, x: torch.Tensor) -> torch.Tensor:
        """The trigger's support: the binary edge map ``float[B, 1, H, W]`` of ``x``."""
        return canny_edges(luma(x), self.threshold, self.blur)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        e = self.edges(x) * self.strength
        return (x + e * (self.ink(x.shape[1], x.device, x.dtype) - x)).clamp(0, 1)
