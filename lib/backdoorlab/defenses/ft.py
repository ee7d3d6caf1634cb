"""FT: plain fine-tuning on the defender's clean data.

Threat model: the defender holds the trained (possibly backdoored) model and a small
clean subset of the training distribution (5% in BackdoorBench); no trigger
knowledge, no poisoned samples.

Hyperparameters (BackdoorBench ``config/defense/ft``): 100 epochs, SGD lr 0.01,
momentum 0.9, weight decay 5e-4, cosine annealing; batch 256. At ``smoke``/``default``
scale the epochs and batch size come from the scale preset (small clean sets need
smaller batches to take enough steps).

>>> purified = defenses.create("ft").purify(model, clean, scale="default")
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..data.bundle import TensorBundle
from ..models import clone
from ..train import fit
from . import register
from .base import Defense


@register("ft")
@dataclass
class FineTuning(Defense):
    epochs: int | None = None
    lr: float = 0.01
    batch_size: int | None = None

    name = "ft"

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def purify(self, model: nn.Module, clean: TensorBundle, *, scale=None, seed: int = 0, progress: bool = True) -> nn.Module:
        purified = clone(model)
        fit(purified, clean, self.recipe(scale, self.epochs, self.lr, self.batch_size), seed=seed, progress=progress,
            desc="ft")
        return purified
