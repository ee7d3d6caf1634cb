"""CLP: Channel Lipschitzness-based Pruning (data-free).

Zheng, Tang, Li & Liu, "Data-free Backdoor Removal based on Channel Lipschitzness",
ECCV 2022, https://arxiv.org/abs/2208.03111.

Threat model: the defender holds only the trained (possibly backdoored) model; no data at
all. ``purify`` ignores the clean bundle it is given (the pipeline passes one to every
purification defense); only a dummy all-zeros input is run once to find the layer pairs.

Method: for each output channel k of a conv followed by a BatchNorm, the upper bound of the
channel Lipschitz constant is ``UCLC_k = sigma_max(W_k) * |gamma_k / sqrt(running_var_k)|``
with ``W_k`` the channel's kernel reshaped to ``[in, kh * kw]`` (all channels of a layer in
one batched ``torch.linalg.matrix_norm(ord=2)``). Within each layer, channels with
``UCLC > mean + u * std`` are pruned by zeroing the BN's weight and bias.

Conv/BN pairing: a BN is paired with the conv whose output tensor *is* the BN's input
(``masking.conv_bn_pairs``, traced on a dummy input). In VGG that is every conv -> its BN.
In the pre-activation ResNet it is ``conv1 -> layer1.0.bn1`` and
``layerX.Y.conv1 -> layerX.Y.bn2``; every other ``bn1`` normalises a residual sum
(conv2 + shortcut) with no single kernel, so those BNs are not scored. (BackdoorBench
pairs each BN with the last conv in module order, which for those ``bn1`` layers is the
previous block's conv2 or shortcut conv -- a bound for only one branch of the sum.)

Hyperparameters (BackdoorBench ``config/defense/clp``): u = 3 (BackdoorBench also sweeps u
over 0..10 and reports each; here u is a field and fixed). No deviation otherwise.

>>> purified = defenses.create("clp").purify(model, None)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models import clone
from . import register
from .base import Defense
from .masking import check_range, conv_bn_pairs, count, outliers, prune


@torch.no_grad()
def uclc(model: nn.Module, in_channels: int) -> dict[str, torch.Tensor]:
    """BN name -> per-channel upper bound of the channel Lipschitz constant."""
    modules = dict(model.named_modules())
    scores = {}
    for bn_name, conv_name in conv_bn_pairs(model, in_channels).items():
        bn, weight = modules[bn_name], modules[conv_name].weight
        spectral = torch.linalg.matrix_norm(weight.float().flatten(2), ord=2)  # [out]
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
        scores[bn_name] = spectral * (gamma / bn.running_var.sqrt()).abs()
    return scores


@register("clp")
@dataclass
class CLP(Defense):
    u: float = 3.0

    name = "clp"

    def __post_init__(self) -> None:
        check_range("u", self.u, 0, float("inf"))

    def purify(self, model: nn.Module, clean=None, *, scale=None, seed: int = 0, progress: bool = True) -> nn.Module:
        purified = clone(model)
        first_conv = next(m for m in purified.modules() if isinstance(m, nn.Conv2d))
        chosen = outliers(uclc(purified, first_conv.in_channels), self.u)
        self.selection = {"pruned": count(chosen), "per_layer": {n: int(c.sum()) for n, c in chosen.items()}}
        return prune(purified, chosen)
