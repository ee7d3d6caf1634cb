"""Datasets as uint8 tensors on the compute device.

>>> from backdoorlab import data
>>> bundle = data.load("mnist5k", device="cpu")

Bundled and offline: ``mnist5k``. Downloaded on first use: ``cifar10``, ``cifar100``,
``gtsrb``, ``tiny-imagenet`` (see :mod:`backdoorlab.data.real`).
"""
from __future__ import annotations

from typing import Any

import torch

from .. import seeding
from ..registry import Registry
from .bundle import TensorBundle, augment, to_float
from .mnist5k import load_mnist5k
from .synthetic import synthetic_cifar
from .real import DatasetNotAvailable, load_cifar10, load_cifar100, load_gtsrb, load_tiny_imagenet

DATASETS: Registry[TensorBundle] = Registry("dataset")
DATASETS.register("mnist5k")(load_mnist5k)
DATASETS.register("cifar10")(load_cifar10)
DATASETS.register("cifar100")(load_cifar100)
DATASETS.register("gtsrb")(load_gtsrb)
DATASETS.register("tiny-imagenet")(load_tiny_imagenet)


NUM_CLASSES = {"mnist5k": 10, "cifar10": 10, "cifar100": 100, "gtsrb": 43, "tiny-imagenet": 200}
SHAPES = {"mnist5k": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "gtsrb": (3, 32, 32),
          "tiny-imagenet": (3, 64, 64)}


def image_shape(name: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of a dataset's images, known without loading it."""
    return SHAPES[check(name)]


def num_classes(name: str) -> int:
    """Class count of a dataset, known without loading it."""
    return NUM_CLASSES[check(name)]


def names() -> list[str]:
    return DATASETS.names()


def check(name: str) -> str:
    """Validate a dataset name without loading it."""
    DATASETS.get(name)
    return name.lower()


def load(name: str, device: Any = "cpu", **options: Any) -> TensorBundle:
    """Load a dataset by name onto ``device`` (the whole set stays resident there)."""
    return DATASETS.create(name, **options).to(device)


def clean_subset(bundle: TensorBundle, ratio: float = 0.05, seed: int = 0, per_class: int | None = None) -> torch.Tensor:
    """Indices of the defender's clean subset, never from the test set: ``int(N * ratio)``
    training samples drawn at random (BackdoorBench's ``choose_index``), or, with
    ``per_class``, that many samples of every class (``choose_by_class``; NFT's
    one-sample-per-class setting is ``per_class=1``). The draw is independent of which
    samples the attack of the same ``seed`` poisoned (``seeding``): about ``pratio`` of the
    subset are clean twins of poisoned images, as in a random draw."""
    g = seeding.stream(seed, "clean-subset")
    n = len(bundle.train_y)
    if per_class is not None:
        counts = torch.bincount(bundle.train_y.cpu(), minlength=bundle.num_classes)
        if per_class < 1 or per_class > int(counts.min()):
            raise ValueError(f"per_class must be in [1, {int(counts.min())}] (the smallest class), got {per_class}")
        order = torch.randperm(n, generator=g)
        labels = bundle.train_y.cpu()[order]
        # rank of each shuffled sample within its class: keep the first `per_class` of each
        onehot = torch.nn.functional.one_hot(labels, bundle.num_classes)
        rank = (onehot.cumsum(0) * onehot).sum(1) - 1
        return order[rank < per_class].sort().values
    if not 0 < ratio <= 1:
        raise ValueError(f"clean ratio must be in (0, 1], got {ratio}")
    k = max(1, int(n * ratio))
    return torch.randperm(n, generator=g)[:k].sort().values


__all__ = ["TensorBundle", "augment", "to_float", "load", "names", "num_classes", "image_shape", "synthetic_cifar", "check", "clean_subset", "DatasetNotAvailable", "DATASETS"]
