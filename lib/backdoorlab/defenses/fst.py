"""FST: Feature Shift Tuning (Min et al., NeurIPS 2023, "Towards Stable Backdoor
Purification through Feature Shift Tuning", https://arxiv.org/abs/2310.01875).

Threat model: the defender holds the trained (possibly backdoored) model and a small
clean subset; no trigger knowledge, no poisoned samples.

Vanilla fine-tuning keeps the backdoored features because the compromised classifier
head still reads them. FST re-initialises the linear head (uniform in
``+-1/sqrt(fan_in)``, weight and bias, as ``nn.Linear``) and fine-tunes the *whole*
model on clean data with

    CE(f(x), y) + alpha * <w, w_orig>

(the inner product with the original head's weight pushes the new head away from it),
while the head's weight norm is held at the original head's norm (rescaled to
``||w_orig||`` after every optimiser step; here at the start of every ``fit`` step, just
before the forward, and once after training -- the same sequence of weights).

Hyperparameters (the authors' code, ``fine_tune/fst.py``; FST is not in BackdoorBench):
``alpha`` 0.2 (CIFAR-10), SGD lr 0.01 momentum 0.9, no weight decay, cosine schedule,
10 epochs, batch 128. ``epochs=None`` takes 10 at ``paper`` scale and the scale preset's
defense epochs below it; ``batch_size=None`` the preset's.

>>> purified = defenses.create("fst").purify(model, clean, scale="default")
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import scales
from ..data.bundle import TensorBundle
from ..models import clone
from ..train import fit
from . import register, tools
from .base import Defense

PAPER_EPOCHS = 10


def head_name(model: nn.Module) -> str:
    """The classifier head: the last ``nn.Linear`` of the model (``linear`` for
    PreAct-ResNet18, ``classifier`` for VGG19-BN)."""
    heads = list(tools.layers(model, nn.Linear))
    if not heads:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier head")
    return heads[-1]


@torch.no_grad()
def reinitialise(head: nn.Linear, generator: torch.Generator) -> None:
    """Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the weight and the bias."""
    bound = 1 / math.sqrt(head.weight.shape[1])
    for p in (head.weight, head.bias):
        if p is not None:
            p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1).mul_(bound).to(p))


@register("fst")
@dataclass
class FeatureShiftTuning(Defense):
    epochs: int | None = None
    lr: float = 0.01
    batch_size: int | None = None
    alpha: float = 0.2

    name = "fst"

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")

    def purify(self, model: nn.Module, clean: TensorBundle, *, scale=None, seed: int = 0,
               progress: bool = True) -> nn.Module:
        purified = clone(model)
        head = dict(purified.named_modules())[head_name(purified)]
        w_orig = head.weight.detach().clone()
        norm = w_orig.norm()
        reinitialise(head, torch.Generator().manual_seed(seed))

        def rescale() -> None:
            with torch.no_grad():
                head.weight.mul_(norm / head.weight.norm().clamp_min(1e-12))

        def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            rescale()  # the norm constraint after the previous step
            logits = m(x)
            return F.cross_entropy(logits.float(), y) + self.alpha * (head.weight * w_orig).sum(), logits

        preset = scales.get(scale)
        epochs = self.epochs or (PAPER_EPOCHS if preset.name == "paper" else preset.defense_epochs)
        fit(purified, clean, self.recipe(scale, epochs, self.lr, self.batch_size, weight_decay=0.0), seed=seed,
            loss_fn=loss, progress=progress, desc="fst")
        rescale()
        purified.eval()
        return purified


__all__ = ["FeatureShiftTuning", "head_name", "reinitialise"]
