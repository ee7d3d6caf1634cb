"""RNP: Reconstructive Neuron Pruning.

Li, Lyu, Ma, Chen, Koren, Li & Ma, "Reconstructive Neuron Pruning for Backdoor Defense",
ICML 2023, https://arxiv.org/abs/2305.14876.

Threat model: the defender holds the trained (possibly backdoored) model and a small
clean subset (1% in BackdoorBench's RNP config, 5% in this pipeline); no trigger
knowledge, no poisoned samples.

Method: (1) *unlearn* the clean data: gradient ascent on the clean cross-entropy (SGD lr
0.01, momentum 0.9, wd 5e-4, lr x0.1 from epoch 10) for at most ``unlearning_epochs``,
stopping after the first epoch whose (training-stream) clean accuracy is
``<= clean_threshold``; (2) on the unlearned model, learn a mask in [0, 1] (init 1) on
every BatchNorm2d scale that *recovers* the clean accuracy: SGD lr 0.2, momentum 0.9,
``recovering_epochs`` over the clean set, loss ``alpha * CE`` (BackdoorBench scales the
loss by alpha), masks clipped to [0, 1], train mode; (3) prune the *original* model's
channels with mask ``<= threshold`` (BN scale zeroed, bias kept, as BackdoorBench prunes)
for thresholds 0, 0.05, ..., ``pruning_max``, or, with ``pruning_by="number"``, the
``k`` smallest-mask channels for k = 0, 1, ... (``pruning_number`` caps k as a fraction of
all BN channels).

Hyperparameters (BackdoorBench ``defense/rnp.py``): clean_threshold 0.20, unlearning lr
0.01, 20 unlearning epochs (milestones [10, 20]), recovering lr 0.2, 20 recovering epochs,
alpha 0.2, pruning_by threshold, pruning_max 0.90, pruning_step 0.05, acc_ratio 0.1.
``batch_size=None`` takes the scale preset's defense batch. ``unlearning_lr=None`` and
``pruning_by=None`` take BackdoorBench's 0.01 and "threshold" at ``paper`` scale, but 0.001
and "number" at ``smoke``/``default``: the narrow (width 8/16) networks collapse under
ascent at 0.01 within one epoch (smoke: clean accuracy 0.84 -> 0.09, and the recovered masks
then shut whole layers, so even threshold 0 destroys the model), and with the gentler
ascent many masks still end at exactly 0, so only pruning by number steps finely enough.

Deviations from BackdoorBench: the pruning level is chosen by the clean-data rule (largest
level whose accuracy on the defender's clean data stays within a relative drop of
``acc_ratio`` of the unpruned model's), never by test ASR; the unlearning runs through
``train.fit`` one epoch per call (constant lr within an epoch, so SGD momentum restarts
each epoch) with its augmentation; BackdoorBench's gradient-norm clipping is called before
``backward`` there and so has no effect, and is left out.

>>> purified = defenses.create("rnp").purify(model, clean, scale="default")
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
from ..train import Recipe, fit, progress_bar
from . import register, tools
from .base import Defense
from .masking import ChannelMasks, below, check_range, frozen, prune_by_clean_rule, smallest, thresholds

PRUNING_BY = ("threshold", "number")


def negated_cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient *ascent* on the clean loss (RNP's unlearning step)."""
    logits = model(x)
    return -F.cross_entropy(logits.float(), y), logits


@register("rnp")
@dataclass
class RNP(Defense):
    clean_threshold: float = 0.20
    unlearning_lr: float | None = None
    unlearning_epochs: int = 20
    recovering_lr: float = 0.2
    recovering_epochs: int = 20
    alpha: float = 0.2
    batch_size: int | None = None
    pruning_by: str | None = None
    pruning_max: float = 0.90
    pruning_step: float = 0.05
    pruning_number: float = 0.70
    acc_ratio: float = 0.1

    name = "rnp"

    def __post_init__(self) -> None:
        check_range("clean_threshold", self.clean_threshold, 0, 1)
        if self.unlearning_lr is not None:
            check_range("unlearning_lr", self.unlearning_lr, 0, float("inf"), low_open=True)
        check_range("recovering_lr", self.recovering_lr, 0, float("inf"), low_open=True)
        check_range("alpha", self.alpha, 0, 1, low_open=True)
        if self.unlearning_epochs < 1 or self.recovering_epochs < 1:
            raise ValueError(f"unlearning_epochs and recovering_epochs must be >= 1, got "
                             f"{self.unlearning_epochs}, {self.recovering_epochs}")
        if self.pruning_by is not None and self.pruning_by not in PRUNING_BY:
            raise ValueError(f"unknown pruning_by {self.pruning_by!r}; valid choices: {', '.join(PRUNING_BY)}")
        check_range("pruning_max", self.pruning_max, 0, 1)
        check_range("pruning_step", self.pruning_step, 0, 1, low_open=True)
        check_range("pruning_number", self.pruning_number, 0, 1)
        check_range("acc_ratio", self.acc_ratio, 0, 1)
        if self.batch_size is not None and self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")

    def unlearn(self, model: nn.Module, clean: TensorBundle, batch_size: int, seed: int, progress: bool,
                base_lr: float = 0.01) -> nn.Module:
        """Step 1: a copy of ``model`` after gradient ascent on the clean data."""
        unlearned = clone(model)
        self.unlearning_trace = []
        for epoch in range(self.unlearning_epochs):
            lr = base_lr * (0.1 if epoch >= 10 else 1.0)  # BackdoorBench milestones [10, 20]
            history = fit(unlearned, clean, Recipe(epochs=1, batch_size=batch_size, lr=lr, schedule="constant"),
                          seed=seed + epoch, loss_fn=negated_cross_entropy, progress=progress, desc="rnp unlearn")
            self.unlearning_trace.append(history.acc[-1])
            if history.acc[-1] <= self.clean_threshold:
                break
        return unlearned

    def recover_masks(self, unlearned: nn.Module, clean: TensorBundle, batch_size: int, seed: int,
                      progress: bool) -> dict[str, torch.Tensor]:
        """Step 2: BN masks on the unlearned model that recover the clean accuracy."""
        net = frozen(unlearned).to(clean.device).train()
        gen = torch.Generator().manual_seed(seed)
        steps = self.recovering_epochs * math.ceil(len(clean.train_y) / batch_size)
        with ChannelMasks(net) as cm, progress_bar(steps, "rnp recover", progress) as bar:
            opt = torch.optim.SGD(cm.masks(), lr=self.recovering_lr, momentum=0.9)
            for _ in range(self.recovering_epochs):
                for x, y in tools.batches(clean, batch_size, gen):
                    opt.zero_grad(set_to_none=True)
                    (self.alpha * F.cross_entropy(net(x), y)).backward()
                    opt.step()
                    cm.clip_()
                    bar.update(1)
            return cm.values()

    def purify(self, model: nn.Module, clean: TensorBundle, *, scale=None, seed: int = 0, progress: bool = True) -> nn.Module:
        preset = scales.get(scale)
        batch_size = self.batch_size or preset.defense_batch_size
        paper = preset.name == "paper"
        lr = self.unlearning_lr or (0.01 if paper else 0.001)
        pruning_by = self.pruning_by or ("threshold" if paper else "number")
        unlearned = self.unlearn(model, clean, batch_size, seed, progress, lr)
        values = self.recover_masks(unlearned, clean, batch_size, seed, progress)
        if pruning_by == "threshold":
            levels, select = thresholds(self.pruning_max, self.pruning_step), lambda t: below(values, t)
        else:
            total = sum(v.numel() for v in values.values())
            levels, select = range(int(self.pruning_number * total) + 1), lambda k: smallest(values, k)
        purified, level, trace = prune_by_clean_rule(model, select, levels, clean, max_drop=self.acc_ratio,
                                                     keep_bias=True)
        self.selection = {pruning_by: level, "unlearning_acc": self.unlearning_trace, "trace": trace}
        return purified
