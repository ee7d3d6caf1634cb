"""Shared model plumbing: every classifier takes images in [0, 1] and normalises
inside ``forward``, so attacks, defenses and re-activation work in pixel space."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class ImageClassifier(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("input_mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("input_std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(self.normalize(x)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def classify(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def scaled(channels: int, width: int) -> int:
    """Channel count at ``width`` (64 = the paper's network)."""
    return max(1, round(channels * width / 64))
