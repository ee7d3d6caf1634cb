"""Frequency-domain triggers shared by FTrojan and CTRL.

The trigger is planted in the blockwise DCT of the image's YUV channels: RGB -> YUV
(ITU-R BT.601, the YUV of FTrojan's paper and of kornia, which CTRL uses) -> orthonormal
2-D DCT-II per ``window x window`` block -> ``+ magnitude / 255`` at the trigger
frequencies of the chosen channels in every block -> inverse DCT -> RGB -> clamp to [0, 1].
The DCT is a matrix product (``D X D^T`` on every block of a whole batch, one einsum).

Every step before the clamp is linear, so the poisoned image is exactly
``clamp(x + pattern)`` with ``pattern = RGB(IDCT(impulses))``: ``FrequencyAttack.apply``
adds that cached pattern; ``frequency_poison`` runs the literal pipeline (the tests
check that both agree).

Positions are (row, column) frequency indices in a window of ``reference`` pixels (the
attack's ``window``, or 32 when the window is the whole image): BackdoorBench's CIFAR
setting. When an image is smaller than that window the effective window is the image
and positions are rescaled, ``p -> round(p * (w - 1) / (reference - 1))`` (on 28x28
MNIST, 15 -> 13 and 31 -> 27: the same relative frequency). An int ``p`` means ``(p, p)``.

One-channel images have no chroma, so the default ``channels=(1, 2)`` (U and V) needs
colour and is refused on grayscale data. ``channels=(0,)`` (``grayscale_params``) puts
the trigger into the luma, which on one-channel images is the image itself: a
documented grayscale variant.
"""
from __future__ import annotations

import math
from numbers import Real

import torch

from .base import Attack

# RGB -> YUV (BT.601, analog U/V as in FTrojan's paper and kornia.color.rgb_to_yuv)
_YUV = ((0.299, 0.587, 0.114), (-0.14713, -0.28886, 0.436), (0.615, -0.51499, -0.10001))


def _color_matrix(inverse: bool, like: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(_YUV, dtype=torch.float64)
    return (torch.linalg.inv(m) if inverse else m).to(like.device, like.dtype)


def rgb_to_yuv(x: torch.Tensor) -> torch.Tensor:
    """``float[B, 3, H, W]`` RGB -> YUV (a one-channel image is its own luma)."""
    return x if x.shape[1] == 1 else torch.einsum("ij,bjhw->bihw", _color_matrix(False, x), x)


def yuv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[1] == 1 else torch.einsum("ij,bjhw->bihw", _color_matrix(True, x), x)


def dct_matrix(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``D`` (``D @ v`` transforms ``v``; ``D.T`` inverts)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.to(device, dtype)


def _blocks(x: torch.Tensor, window: int) -> torch.Tensor:
    b, c, h, w = x.shape
    if h % window or w % window:
        raise ValueError(f"image size {h}x{w} is not a multiple of the DCT window {window}")
    return x.reshape(b, c, h // window, window, w // window, window)


def block_dct(x: torch.Tensor, window: int) -> torch.Tensor:
    """2-D DCT-II of every ``window x window`` block of a batch ``[B, C, H, W]``."""
    d = dct_matrix(window, x.device, x.dtype)
    return torch.einsum("ki,bcyixj,lj->bcykxl", d, _blocks(x, window), d).reshape(x.shape)


def block_idct(coeffs: torch.Tensor, window: int) -> torch.Tensor:
    d = dct_matrix(window, coeffs.device, coeffs.dtype)
    return torch.einsum("ki,bcykxl,lj->bcyixj", d, _blocks(coeffs, window), d).reshape(coeffs.shape)


def effective_window(window: int | None, height: int, width: int) -> int:
    """The DCT block side used on an ``height x width`` image."""
    side = min(height, width) if window is None else min(window, height, width)
    if height % side or width % side:
        raise ValueError(f"image size {height}x{width} must be a multiple of the DCT window {side} "
                         f"(window={window}: at most the image size, whole blocks only)")
    return side


def scaled_positions(positions, reference: int, side: int) -> list[tuple[int, int]]:
    pairs = [(p, p) if isinstance(p, int) else tuple(p) for p in positions]
    if side >= reference:
        return pairs
    return [tuple(round(v * (side - 1) / (reference - 1)) for v in pair) for pair in pairs]


def impulses(channels, positions, magnitude: float, window: int | None, shape, device=None,
             dtype=torch.float32) -> tuple[torch.Tensor, int]:
    """The added DCT coefficients ``[1, C, H, W]`` (every block) and the window used."""
    c, h, w = shape
    side = effective_window(window, h, w)
    z = torch.zeros(1, c, h, w, dtype=torch.float64)
    for r, col in scaled_positions(positions, window or 32, side):
        if c == 1 and tuple(channels) != (0,):
            raise ValueError(needs_colour(channels))
        for ch in sorted(set(channels)):
            z[0, ch, r::side, col::side] += magnitude / 255.0
    return z.to(device, dtype), side


def frequency_poison(x: torch.Tensor, channels, positions, magnitude: float, window: int | None) -> torch.Tensor:
    """The literal trigger pipeline, batched: YUV -> DCT -> add -> IDCT -> RGB -> clamp."""
    z, side = impulses(channels, positions, magnitude, window, x.shape[1:], x.device, x.dtype)
    coeffs = block_dct(rgb_to_yuv(x), side) + z
    return yuv_to_rgb(block_idct(coeffs, side)).clamp(0, 1)


def frequency_pattern(channels, positions, magnitude: float, window: int | None, shape, device=None,
                      dtype=torch.float32) -> torch.Tensor:
    """``[1, C, H, W]``: what the trigger adds to any image before the clamp."""
    z, side = impulses(channels, positions, magnitude, window, shape, device, torch.float64)
    return yuv_to_rgb(block_idct(z, side)).to(dtype)


def needs_colour(channels) -> str:
    return (f"the trigger goes into YUV channels {tuple(channels)}, and U (1) / V (2) need colour, but the images "
            "are grayscale (1 channel); pass channels=(0,) for the luma variant, or use a colour dataset")


class FrequencyAttack(Attack):
    """Shared checks and kernel; subclasses declare ``channels``, ``positions``,
    ``magnitude`` and ``window`` as dataclass fields with their defaults."""

    grayscale_params = {"channels": (0,)}

    def _check_frequency_params(self) -> None:
        for key in ("channels", "positions"):
            if isinstance(getattr(self, key), list):
                setattr(self, key, tuple(tuple(v) if isinstance(v, list) else v for v in getattr(self, key)))
        if (not isinstance(self.channels, tuple) or not self.channels or len(set(self.channels)) != len(self.channels)
                or any(isinstance(c, bool) or c not in (0, 1, 2) for c in self.channels)):
            raise ValueError(f"channels must be distinct YUV channel indices from 0 (Y), 1 (U), 2 (V), got {self.channels!r}")
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2):
            raise ValueError(f"window must be an integer >= 2 (DCT block side) or None (the whole image), got {self.window!r}")
        reference = self.window or 32
        for p in self.positions if isinstance(self.positions, tuple) and self.positions else [None]:
            pair = (p, p) if isinstance(p, int) and not isinstance(p, bool) else p
            if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                      and 0 <= v < reference for v in pair)):
                raise ValueError(f"positions must be (row, col) pairs or ints p (= (p, p)) inside the {reference}x{reference} "
                                 f"DCT window, i.e. in 0..{reference - 1}; got {self.positions!r}")
        if isinstance(self.magnitude, bool) or not isinstance(self.magnitude, Real) or not 0 < self.magnitude <= 255:
            raise ValueError(f"magnitude must be in (0, 255] (DCT units on the 0..255 scale), got {self.magnitude!r}")

    def validate(self, num_classes: int, shape: tuple[int, int, int] | None = None) -> None:
        super().validate(num_classes, shape)
        if shape is not None:
            if shape[0] not in (1, 3):
                raise ValueError(f"{self.name} needs RGB (3-channel) or grayscale (1-channel) images, got {shape[0]} channels")
            if shape[0] == 1 and tuple(self.channels) != (0,):
                raise ValueError(f"{self.name}: {needs_colour(self.channels)}")
            effective_window(self.window, shape[1], shape[2])

    def pattern(self, shape, device, dtype=torch.float32) -> torch.Tensor:
        key = ("pattern", tuple(shape), device, dtype)
        return self.cached(key, lambda: frequency_pattern(self.channels, self.positions, self.magnitude,
                                                          self.window, shape, device, dtype))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.pattern(x.shape[1:], x.device, x.dtype)).clamp(0, 1)
