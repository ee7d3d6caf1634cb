"""BNP: BatchNorm-statistics-based pruning (the KL strategy of "Pre-activation Distributions
Expose Backdoor Neurons").

Zheng, Tang, Li & Liu, "Pre-activation Distributions Expose Backdoor Neurons", NeurIPS 2022,
https://openreview.net/forum?id=wwW-1k1ljIg.

Threat model: the defender holds the trained (possibly backdoored) model and a small clean
subset; no trigger knowledge, no poisoned samples. (The paper's other strategy, EP, needs the
poisoned training set instead: see ``ep.py``.) Not data-free: the clean samples are needed.

Method: a BN's running statistics were accumulated on the *poisoned* training set, so for a
backdoor neuron they describe a mixture shifted by the poisoned samples. For every BN channel,
model the pre-activation (the BN input) on the defender's clean data as N(mu_c, var_c) and the
training data as N(running_mean, running_var), and score the channel by
``KL(N(mu_c, var_c) || N(running_mean, running_var))``. Within each BN layer, channels with a
score above ``mean + u * std`` are pruned (BN weight and bias zeroed).

Hyperparameters (BackdoorBench ``config/defense/bnp``): u = 3 (BackdoorBench also sweeps u over
0..10); the clean statistics come from the defender's clean subset (BackdoorBench ratio 0.05;
the authors' code uses one batch of 500 held-out images).

Deviations: the clean statistics are exact over the whole clean subset (eval mode, biased
variance) rather than one batch; the KL divergence is the exact Gaussian one,
``log(sigma_r / sigma_c) + (var_c + (mu_c - mu_r)^2) / (2 var_r) - 1/2`` as in the authors' code
(BackdoorBench writes ``log(var_r / var_c)``, twice the log term, and -- because its BN layer
keeps the statistics of the *last* forward -- measures the poisoned batch instead of the clean
one); pruning zeroes the BN bias too, as BackdoorBench does (the authors zero only the weight).

>>> purified = defenses.create("bnp").purify(model, clean)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data.bundle import TensorBundle
from ..models import clone
from . import register
from .base import Defense
from .masking import bn_input_stats, bn_layers, check_range, count, outliers, prune


@torch.no_grad()
def kl_scores(model: nn.Module, clean_x: torch.Tensor) -> dict[str, torch.Tensor]:
    """BN name -> per-channel KL(clean pre-activation Gaussian || running-statistics Gaussian)."""
    stats = bn_input_stats(model, clean_x)
    scores = {}
    for name, bn in bn_layers(model).items():
        mu_c, var_c = stats[name]
        mu_r, var_r = bn.running_mean.float(), bn.running_var.float()
        var_c, var_r = var_c.clamp_min(bn.eps), var_r.clamp_min(bn.eps)
        scores[name] = 0.5 * (var_r / var_c).log() + (var_c + (mu_c - mu_r).square()) / (2 * var_r) - 0.5
    return scores


@register("bnp")
@dataclass
class BNP(Defense):
    u: float = 3.0

    name = "bnp"

    def __post_init__(self) -> None:
        check_range("u", self.u, 0, float("inf"))

    def purify(self, model: nn.Module, clean: TensorBundle, *, scale=None, seed: int = 0, progress: bool = True) -> nn.Module:
        purified = clone(model).to(clean.device)
        chosen = outliers(kl_scores(purified, clean.train_x), self.u)
        self.selection = {"pruned": count(chosen), "per_layer": {n: int(c.sum()) for n, c in chosen.items()}}
        return prune(purified, chosen)
