"""Per-neuron diagnostics the papers plot (analysis only: these look at triggered test
images, which no defense is allowed to do).

- ``trigger_activation_change``: how much each channel of a layer moves when the trigger
  is added (TAC, as in the FT-SAM and TSBD papers' analyses): the mean over non-target
  test images and positions of ``|a(attack(x)) - a(x)|``;
- ``weight_norms``: the L2 norm of each output channel's weights (FT-SAM's
  "backdoor-related neurons have large norms");
- ``rank_correlation``: Spearman's rho, to report how two per-neuron scores agree.

>>> tac = analysis.trigger_activation_change(model, data, attack, "layer4.1.conv2")
>>> norms = analysis.weight_norms(model, "layer4.1.conv2")
"""
from __future__ import annotations

import torch
from torch import nn

from .attacks.base import Attack
from .data.bundle import TensorBundle, to_float
from .defenses.tools import activations


@torch.no_grad()
def trigger_activation_change(model: nn.Module, data: TensorBundle, attack: Attack, layer: str,
                              limit: int | None = 1000, batch_size: int = 512) -> torch.Tensor:
    """Per output channel of ``layer``: mean ``|a(poisoned) - a(clean)|`` over up to ``limit``
    non-target test images (and spatial positions)."""
    keep = attack.test_mask(data.test_y)
    x = to_float(data.test_x[keep][:limit])
    clean = activations(model, x, layer, batch_size)
    poisoned = activations(model, torch.cat([attack.apply(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]),
                           layer, batch_size)
    change = (poisoned - clean).abs()
    return change.mean(dim=[d for d in range(change.dim()) if d != 1])


@torch.no_grad()
def weight_norms(model: nn.Module, layer: str) -> torch.Tensor:
    """The L2 norm of each output channel's weights of a Conv2d/Linear ``layer``."""
    modules = dict(model.named_modules())
    if layer not in modules or not isinstance(modules[layer], (nn.Conv2d, nn.Linear)):
        convs = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
        raise ValueError(f"{layer!r} is not a conv or linear layer of the model; valid choices: {', '.join(convs)}")
    w = modules[layer].weight
    return w.detach().flatten(1).norm(dim=1)


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two equally long score vectors (ties by order)."""
    if a.shape != b.shape or a.dim() != 1 or len(a) < 2:
        raise ValueError(f"need two 1-D score vectors of the same length >= 2, got {tuple(a.shape)} and {tuple(b.shape)}")
    ra = a.double().argsort().argsort().double()
    rb = b.double().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


__all__ = ["trigger_activation_change", "weight_norms", "rank_correlation"]
