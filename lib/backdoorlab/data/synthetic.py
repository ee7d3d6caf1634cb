"""Procedural data for benchmarks: random uint8 images shaped like CIFAR-10.

Throughput does not depend on image content, and CIFAR-10 itself cannot be downloaded
on an offline GPU machine, so the speed benchmarks train on this.
"""
from __future__ import annotations

import torch

from .bundle import TensorBundle


def synthetic_cifar(n: int = 50_000, seed: int = 0) -> TensorBundle:
    """``n`` random 3x32x32 uint8 images with random labels over 10 classes, CIFAR-10's
    normalisation and augmentation; the first 1,000 double as the test set."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorBundle("synthetic-cifar", x, y, x[:1000], y[:1000], 10, (0.4914, 0.4822, 0.4465),
                        (0.247, 0.243, 0.261), flip=True, crop_padding=4)
