"""ABL: Anti-Backdoor Learning, a training-time defense.

Paper: Yige Li, Xixiang Lyu, Nodens Koren, Lingjuan Lyu, Bo Li, Xingjun Ma,
"Anti-Backdoor Learning: Training Clean Models on Poisoned Data", NeurIPS 2021,
https://arxiv.org/abs/2110.11571.

Threat model: the defender trains the model itself on the poisoned training set it was
given (which samples are poisoned is unknown); no clean data, no trigger knowledge.

Method (four phases, each one ``train.fit`` run):

1. *Isolation* (``tuning_epochs``): train on the whole poisoned set with the local
   gradient ascent (LGA) loss ``sign(CE - gamma) * CE`` (batch-mean CE, ``gamma = 0.5``):
   once the loss falls below ``gamma`` the step becomes ascent, which holds clean samples
   near ``gamma`` while the easier-to-learn poisoned samples keep a much lower loss.
2. Isolate the ``isolation_ratio`` (1 %) fraction of training samples with the lowest
   per-sample CE (eval mode, no augmentation).
3. *Fine-tuning* (``finetuning_epochs``): keep training the same model with plain CE on
   the other samples (lr ``lr_finetuning``).
4. *Unlearning* (``unlearning_epochs``): gradient ascent (negated CE) on the isolated
   samples, SGD lr ``lr_unlearning = 5e-4``, constant.

Hyperparameters (BackdoorBench ``config/defense/abl/cifar10.yaml``): tuning_epochs 20,
finetuning_epochs 60, unlearning_epochs 20, lr_finetuning_init 0.1, lr_unlearning_init
5e-4, momentum 0.9, weight_decay 1e-4, isolation_ratio 0.01, gamma 0.5 (the paper's text
uses T_te = 20 and 5 unlearning epochs in its quick setting). Epoch counts left ``None``
take 20 % (at least 3: the poisoned samples must be learnt before isolation) and 60 % of
the scale's attack-training epochs for isolation and fine-tuning, and 20 unlearning
epochs at every scale (the isolated set is 1 % of the data, so this is cheap; with fewer
steps the ascent does not remove the backdoor at smoke scale); paper scale: 20/60/20,
smoke: 3/2/20. Batch size ``None`` takes the scale's training batch size at ``paper`` scale
and 32 below it: at ``default`` scale (mnist5k, 4,000 images) three isolation epochs at batch
128 leave the poisoned samples unlearnt (isolation precision 0.0, then ACC 0.30 / ASR 1.0),
at batch 32 they are learnt first (precision 1.0; ACC 0.78 / ASR 0.31). The isolation phase uses lr
``lr_isolation = 0.01`` (BackdoorBench's ``lr``); schedules are cosine except the constant
unlearning rate. Deviation: the phases run as separate ``fit`` calls, so momentum
buffers restart at each phase.

After ``train`` the isolated training indices are kept in ``isolated_`` (for reporting
isolation precision against the ground truth).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import scales
from ..data.bundle import TensorBundle, to_float
from ..train import Recipe, autocast, fit
from . import register
from .base import TrainingDefense


def lga_loss(gamma: float):
    """``sign(CE - gamma) * CE``: ABL's local gradient ascent objective."""
    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        logits = model(x)
        ce = F.cross_entropy(logits.float(), y)
        return torch.sign(ce.detach() - gamma) * ce, logits
    return loss_fn


def ascent_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Negated CE: a ``fit`` step on it is a gradient-ascent step."""
    logits = model(x)
    return -F.cross_entropy(logits.float(), y), logits


@torch.no_grad()
def per_sample_loss(model: nn.Module, bundle: TensorBundle, batch_size: int = 1024) -> torch.Tensor:
    """Cross-entropy of every training sample of ``bundle`` (eval mode, no augmentation)."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(bundle.train_y), batch_size):
        x = to_float(bundle.train_x[start:start + batch_size])
        with autocast(x.device):
            logits = model(x).float()
        out.append(F.cross_entropy(logits, bundle.train_y[start:start + batch_size], reduction="none"))
    model.train(was_training)
    return torch.cat(out)


SMALL_BATCH = 32  # ABL's batch below `paper` scale (see the module docstring)


@register("abl")
@dataclass
class AntiBackdoorLearning(TrainingDefense):
    tuning_epochs: int | None = None
    finetuning_epochs: int | None = None
    unlearning_epochs: int | None = None
    isolation_ratio: float = 0.01
    gamma: float = 0.5
    lr_isolation: float = 0.01
    lr_finetuning: float = 0.1
    lr_unlearning: float = 5e-4
    weight_decay: float = 1e-4
    batch_size: int | None = None
    isolated_: torch.Tensor | None = field(default=None, init=False, repr=False)

    name = "abl"

    def __post_init__(self) -> None:
        for key in ("tuning_epochs", "finetuning_epochs", "unlearning_epochs", "batch_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1 (or None for the scale preset), got {value}")
        if not 0 < self.isolation_ratio < 1:
            raise ValueError(f"isolation_ratio must be in (0, 1), got {self.isolation_ratio}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        for key in ("lr_isolation", "lr_finetuning", "lr_unlearning"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")

    def epochs(self, scale) -> tuple[int, int, int]:
        """(tuning, finetuning, unlearning) epochs: the fields, else 20 % (at least 3) and 60 % (at
        least 1) of the scale's training epochs and BackdoorBench's 20 unlearning epochs."""
        total = scales.get(scale).epochs
        default = (max(3, round(0.2 * total)), max(1, round(0.6 * total)), 20)
        given = (self.tuning_epochs, self.finetuning_epochs, self.unlearning_epochs)
        return tuple(g if g is not None else d for g, d in zip(given, default))  # type: ignore[return-value]

    def isolate(self, model: nn.Module, poisoned: TensorBundle) -> torch.Tensor:
        """Indices of the ``isolation_ratio`` lowest-loss training samples (at least 2)."""
        losses = per_sample_loss(model, poisoned)
        k = min(len(losses) - 1, max(2, round(self.isolation_ratio * len(losses))))
        return losses.topk(k, largest=False).indices.sort().values

    def train(self, model: nn.Module, poisoned: TensorBundle, *, scale=None, seed: int = 0,
              progress: bool = True) -> nn.Module:
        n = len(poisoned.train_y)
        if n < 4:
            raise ValueError(f"ABL needs at least 4 training samples, got {n}")
        tuning, finetuning, unlearning = self.epochs(scale)
        preset = scales.get(scale)
        batch = self.batch_size or (preset.batch_size if preset.name == "paper" else SMALL_BATCH)
        fit(model, poisoned, Recipe(tuning, batch, self.lr_isolation, weight_decay=self.weight_decay),
            seed=seed, loss_fn=lga_loss(self.gamma), progress=progress, desc="abl isolation")
        isolated = self.isolate(model, poisoned)
        keep = torch.ones(n, dtype=torch.bool, device=isolated.device)
        keep[isolated] = False
        self.isolated_ = isolated
        fit(model, poisoned.subset(torch.nonzero(keep).flatten()),
            Recipe(finetuning, batch, self.lr_finetuning, weight_decay=self.weight_decay),
            seed=seed + 1, progress=progress, desc="abl finetuning")
        fit(model, poisoned.subset(isolated),
            Recipe(unlearning, min(batch, len(isolated)), self.lr_unlearning, weight_decay=self.weight_decay,
                   schedule="constant"),
            seed=seed + 2, loss_fn=ascent_loss, progress=progress, desc="abl unlearning")
        model.eval()
        return model
