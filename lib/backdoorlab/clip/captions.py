"""Procedural image-caption pairs: a stand-in for CC3M that needs no download.

Each 32x32 RGB scene holds one shape of one of ten classes (``CLASSES``; ``banana``, the
target of BadCLIP's experiments, is one of them) in one of eight colours, two sizes and
five positions, on one of four backgrounds (plain black, plain grey, noise, stripes). Its
caption is drawn from varied templates that mention some of these attributes, e.g. "a
small red star on a striped background" or "there is a ring in the top of the picture".
Images are drawn for the whole set at once (one implicit function per class, evaluated on
a coordinate grid for every image); captions are formatted strings. Zero-shot evaluation
uses the test scenes' shape class and the prompt ``TEMPLATES``.

Everything is a function of ``seed``, so the same call gives the same set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..data.bundle import TensorBundle
from .models import CONTEXT_LENGTH, tokenize

CLASSES = ("banana", "star", "ring", "cross", "square", "triangle", "circle", "diamond", "bar", "heart")
COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.9, 0.1),
           "purple": (0.6, 0.2, 0.8), "orange": (1.0, 0.55, 0.0), "white": (0.95, 0.95, 0.95),
           "cyan": (0.1, 0.85, 0.9)}
SIZES = {"small": (5.0, 7.0), "large": (9.0, 12.0)}  # radius in pixels at 32x32
POSITIONS = {"centre": (0, 0), "left": (0, -1), "right": (0, 1), "top": (-1, 0), "bottom": (1, 0)}
BACKGROUNDS = ("black", "grey", "noisy", "striped")
CAPTION_TEMPLATES = (
    "a photo of a {size} {colour} {shape}.",
    "a {colour} {shape} on a {background} background.",
    "a {size} {shape} in {colour}.",
    "there is a {shape} in the {position} of the picture.",
    "a picture of a {shape}.",
    "a {colour} {shape}, {size}, on {background}.",
    "an image showing a {shape} that is {colour}.",
    "a {size} {colour} {shape} on the {position}.",
    "my drawing of a {colour} {shape}.",
    "the {shape} is {colour} and {size}.",
    "a {shape} on a {background} background, drawn in {colour}.",
    "look at this {size} {shape}!",
)
TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "a drawing of a {}.", "an image showing a {}.")


@dataclass
class CaptionSet:
    """Image-caption pairs (``images uint8[N, 3, 32, 32]``, ``captions``, ``tokens``) with each
    image's shape class in ``labels``, plus a labelled test set for zero-shot evaluation."""

    images: torch.Tensor
    labels: torch.Tensor
    captions: list[str]
    tokens: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classnames: tuple[str, ...] = CLASSES
    templates: tuple[str, ...] = TEMPLATES
    name: str = "shapes"

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, index: torch.Tensor) -> "CaptionSet":
        """The pairs at ``index`` (the test set is kept)."""
        index = index.to(self.images.device)
        return replace(self, images=self.images[index], labels=self.labels[index], tokens=self.tokens[index],
                       captions=[self.captions[i] for i in index.tolist()])

    def as_bundle(self) -> TensorBundle:
        """The pairs as a ``TensorBundle`` for ``train.fit``: ``train_y`` is each pair's row,
        which the CLIP losses use to look up its tokens."""
        rows = torch.arange(len(self), device=self.images.device)
        return TensorBundle(self.name, self.images, rows, self.test_images, self.test_labels,
                            num_classes=len(self.classnames), mean=(0.0,), std=(1.0,), flip=False, crop_padding=2)

    def to(self, device) -> "CaptionSet":
        return replace(self, images=self.images.to(device), labels=self.labels.to(device),
                       tokens=self.tokens.to(device), test_images=self.test_images.to(device),
                       test_labels=self.test_labels.to(device))


def shape_masks(kind: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Boolean ``[N, H, W]``: pixel inside shape ``kind[n]``, with ``u`` (right) and ``v``
    (down) the pixel coordinates relative to the shape's centre, in units of its radius."""
    r = torch.sqrt(u * u + v * v)
    theta = torch.atan2(v, u)
    inside = torch.stack([
        (r <= 1) & ((u - 0.45) ** 2 + (v + 0.35) ** 2 > 0.75 ** 2),  # banana: a crescent
        r <= 0.45 + 0.55 * torch.cos(2.5 * (theta + math.pi / 2)).abs(),  # star
        (r <= 1) & (r >= 0.6),  # ring
        ((u.abs() <= 0.3) & (v.abs() <= 1)) | ((v.abs() <= 0.3) & (u.abs() <= 1)),  # cross
        torch.maximum(u.abs(), v.abs()) <= 0.85,  # square
        (v <= 0.85) & (u.abs() <= (v + 1) / 1.85 * 0.95),  # triangle, apex up
        r <= 0.95,  # circle
        u.abs() + v.abs() <= 1.05,  # diamond
        (v.abs() <= 0.3) & (u.abs() <= 1),  # bar
        ((u * 1.1) ** 2 + (-v * 1.1 - 0.3 * (u * 1.1).abs() ** 0.5) ** 2 <= 0.9),  # heart
    ])  # [K, N, H, W]
    return inside.gather(0, kind.view(1, -1, 1, 1).expand(1, *u.shape)).squeeze(0)


def draw(kind: torch.Tensor, colour: torch.Tensor, size: torch.Tensor, position: torch.Tensor,
         background: torch.Tensor, generator: torch.Generator, side: int = 32) -> torch.Tensor:
    """uint8 ``[N, 3, side, side]`` scenes for per-image attribute indices (batched)."""
    n = len(kind)
    lo = torch.tensor([s[0] for s in SIZES.values()])[size]
    hi = torch.tensor([s[1] for s in SIZES.values()])[size]
    radius = lo + (hi - lo) * torch.rand(n, generator=generator)
    offset = torch.tensor(list(POSITIONS.values()), dtype=torch.float32)[position]  # [N, 2] (row, col) direction
    room = (side / 2 - radius - 1).clamp(min=0)
    jitter = (torch.rand(n, 2, generator=generator) - 0.5) * 3
    centre = side / 2 - 0.5 + offset * room[:, None] * 0.85 + jitter
    grid = torch.arange(side, dtype=torch.float32)
    v = (grid.view(1, side, 1) - centre[:, 0].view(n, 1, 1)) / radius.view(n, 1, 1)
    u = (grid.view(1, 1, side) - centre[:, 1].view(n, 1, 1)) / radius.view(n, 1, 1)
    mask = shape_masks(kind, u.expand(n, side, side), v.expand(n, side, side)).unsqueeze(1)
    rgb = torch.tensor(list(COLOURS.values()))[colour]  # [N, 3]
    rgb = (rgb + 0.08 * torch.randn(n, 3, generator=generator)).clamp(0, 1)
    noise = torch.rand(n, 1, side, side, generator=generator) * 0.45
    stripes = ((grid.view(1, 1, side, 1) + grid.view(1, 1, 1, side)) % 8 < 4).float() * 0.35
    base = torch.stack([torch.zeros(n, 1, side, side), torch.full((n, 1, side, side), 0.45),
                        noise, stripes.expand(n, 1, side, side)])  # [4, N, 1, H, W]
    bg = base.gather(0, background.view(1, n, 1, 1, 1).expand(1, n, 1, side, side)).squeeze(0).expand(n, 3, side, side)
    img = torch.where(mask, rgb.view(n, 3, 1, 1).expand(n, 3, side, side), bg)
    return (img * 255).round().to(torch.uint8)


def _attributes(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"kind": torch.randint(len(CLASSES), (n,), generator=generator),
            "colour": torch.randint(len(COLOURS), (n,), generator=generator),
            "size": torch.randint(len(SIZES), (n,), generator=generator),
            "position": torch.randint(len(POSITIONS), (n,), generator=generator),
            "background": torch.randint(len(BACKGROUNDS), (n,), generator=generator)}


def captions_for(attrs: dict[str, torch.Tensor], generator: torch.Generator) -> list[str]:
    """One caption per image from a random template naming some of its attributes."""
    template = torch.randint(len(CAPTION_TEMPLATES), (len(attrs["kind"]),), generator=generator).tolist()
    names = {"shape": CLASSES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": tuple(POSITIONS),
             "background": BACKGROUNDS}
    columns = {k: attrs["kind" if k == "shape" else k].tolist() for k in names}
    return [CAPTION_TEMPLATES[t].format(**{k: names[k][columns[k][i]] for k in names}).replace("the centre of", "the middle of")
            for i, t in enumerate(template)]


def generate(n_train: int, n_test: int = 1000, seed: int = 0) -> CaptionSet:
    """``n_train`` captioned scenes and ``n_test`` labelled test scenes (different draws)."""
    if n_train < 2 or n_test < 1:
        raise ValueError(f"need n_train >= 2 and n_test >= 1, got {n_train}, {n_test}")
    g = torch.Generator().manual_seed(seed)
    attrs = _attributes(n_train, g)
    images = draw(attrs["kind"], attrs["colour"], attrs["size"], attrs["position"], attrs["background"], g)
    captions = captions_for(attrs, g)
    test = _attributes(n_test, g)
    test_images = draw(test["kind"], test["colour"], test["size"], test["position"], test["background"], g)
    return CaptionSet(images, attrs["kind"], captions, tokenize(captions, CONTEXT_LENGTH), test_images, test["kind"])
