"""EP: Entropy-based Pruning (the differential-entropy strategy of "Pre-activation
Distributions Expose Backdoor Neurons").

Zheng, Tang, Li & Liu, "Pre-activation Distributions Expose Backdoor Neurons", NeurIPS 2022,
https://openreview.net/forum?id=wwW-1k1ljIg.

Threat model (the paper's and BackdoorBench's): the defender holds the trained model and the
*training set it was trained on* -- poisoned samples included, but unidentified. On such a
mixture a backdoor neuron's pre-activation is bimodal (benign and poisoned populations have
different moments), so, standardised, its distribution has a *lower* entropy than a Gaussian-
like benign neuron's. EP is not data-free and is not meant for a clean-only subset: with
clean data alone the poisoned mode is absent and the signal with it. ``purify`` scores the
images of ``data.train_x``; ``data_source = "poisoned_training_set"`` tells the pipeline which
bundle EP wants (with the clean subset it still runs, but does not find backdoor neurons).

Method (as BackdoorBench's ``defense/ep.py`` and the authors' code): for every BatchNorm2d take,
per sample and channel, the spatial maximum of the BN *input* on ``samples`` random training
images (eval mode); standardise each channel over the samples; estimate its entropy from a
histogram with bins of width ``bin_width`` (shared origin: the minimum over the layer); within
each layer prune channels with entropy below ``mean - u * std`` (BN weight and bias zeroed).

Hyperparameters (BackdoorBench ``config/defense/ep``): u = 3 (BackdoorBench also sweeps u over
0..10), bin width 0.1, one batch of 256 training images (the authors: 500 images, bins 0.01).

The training sample is drawn from its own random stream: drawn from the attack's seed, it
would be nothing but poisoned images and the two populations would never meet.

A limit seen on mnist5k's digits: a channel whose spatial maximum lies on the constant black
background has almost the same maximum on every image, so its standardised histogram has few
bins and a low entropy, whether or not it matters. On the `default` FTrojan model EP prunes
such a channel (``layer1.0.bn1``, entropy 0.35 against a layer mean of 3.3) and clean accuracy
falls from 0.98 to 0.10; that one channel alone does it. Natural images rarely have such
constant regions.

Deviations: values on a bin edge are counted in the bin above (BackdoorBench's strict
inequalities drop them); labels are never used.

>>> purified = defenses.create("ep").purify(model, poisoned_training_set)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .. import seeding
from ..data.bundle import TensorBundle
from ..models import clone
from . import register
from .base import Defense
from .masking import bn_input_maxima, check_range, count, outliers, prune


def histogram_entropy(feats: torch.Tensor, bin_width: float) -> torch.Tensor:
    """Per row of ``feats`` [C, N], the entropy (nats) of its histogram with bins of
    ``bin_width`` starting at the minimum over all rows."""
    idx = ((feats - feats.min()) / bin_width).floor().long()
    counts = torch.zeros(feats.shape[0], int(idx.max()) + 1, device=feats.device)
    counts.scatter_add_(1, idx, torch.ones_like(feats))
    p = counts / feats.shape[1]
    return -(p * p.clamp_min(1e-30).log()).sum(1)


def training_sample(n: int, k: int, seed: int) -> torch.Tensor:
    """``k`` random indices out of ``n`` training samples, drawn independently of the samples
    the attack of the same seed poisoned (``seeding``), so about ``pratio`` of them are
    poisoned: the mixture EP's signal needs."""
    return torch.randperm(n, generator=seeding.stream(seed, "ep-sample"))[:k]


@torch.no_grad()
def entropy_scores(model: nn.Module, x: torch.Tensor, bin_width: float) -> dict[str, torch.Tensor]:
    """BN name -> per-channel histogram entropy of the standardised pre-activation maxima."""
    scores = {}
    for name, feats in bn_input_maxima(model, x).items():
        z = (feats - feats.mean(1, keepdim=True)) / feats.std(1, keepdim=True).clamp_min(1e-12)
        scores[name] = histogram_entropy(z, bin_width)
    return scores


@register("ep")
@dataclass
class EP(Defense):
    u: float = 3.0
    bin_width: float = 0.1
    samples: int = 256

    name = "ep"
    data_source: ClassVar[str] = "poisoned_training_set"

    def __post_init__(self) -> None:
        check_range("u", self.u, 0, float("inf"))
        check_range("bin_width", self.bin_width, 0, float("inf"), low_open=True)
        if self.samples < 2:
            raise ValueError(f"samples must be >= 2, got {self.samples}")

    def purify(self, model: nn.Module, data: TensorBundle, *, scale=None, seed: int = 0, progress: bool = True) -> nn.Module:
        pick = training_sample(len(data.train_y), self.samples, seed)
        purified = clone(model).to(data.device)
        chosen = outliers(entropy_scores(purified, data.train_x[pick.to(data.device)], self.bin_width), self.u, low=True)
        self.selection = {"pruned": count(chosen), "per_layer": {n: int(c.sum()) for n, c in chosen.items()}}
        return prune(purified, chosen)
