"""FP: Fine-Pruning (Liu, Dolan-Gavitt & Garg, RAID 2018, "Fine-Pruning: Defending Against
Backdooring Attacks on Deep Neural Networks", https://arxiv.org/abs/1805.12185).

Threat model: the defender holds the trained (possibly backdoored) model and a small
clean subset of the training distribution; no trigger knowledge, no poisoned samples.

Mechanism (BackdoorBench ``defense/fp.py``): record the input of the last Linear layer
(the pooled features of the last conv block, ``layer4`` / ``features``) on the clean
data, rank its channels by mean activation, and prune them in ascending order of
activation (neurons dormant on clean data, where a backdoor hides, go first) in steps of
``once_prune_ratio`` x channels while the clean accuracy stays within a relative drop of
``acc_ratio``; then fine-tune on the clean data with the pruned channels held at zero.

Pruning is written into the weights: the pruned input columns of the Linear layer are
zero (a gradient hook keeps them at zero while fine-tuning, and they are zeroed again
afterwards), so a saved state dict keeps the pruning and the architecture is unchanged.

Hyperparameters (BackdoorBench ``config/defense/fp``): ``once_prune_ratio`` 0.01,
``acc_ratio`` 0.1, fine-tuning 100 epochs SGD lr 0.01 (momentum 0.9, wd 5e-4, cosine),
batch 256. ``epochs``/``batch_size`` left as ``None`` take the scale preset's defense
epochs and batch size (``paper``: 100 / 256).

Deviations from BackdoorBench: the accuracy that decides the pruning level is measured
on the defender's clean subset, not on the test set; all levels are scored from one
forward pass (the pooled features are recorded once and only the Linear layer is
re-evaluated per level, which gives the same predictions as re-running a pruned copy).
BackdoorBench masks ``layer4.1.conv2``'s output channels; with PreAct-ResNet's residual
sum that leaves the shortcut path of the channel alive, so we prune the Linear layer's
input columns, which removes exactly the ranked (pooled) channel.

After ``purify`` the object's ``report`` holds the layer, channel count, pruning order,
the number pruned and the clean-accuracy trace of every level tried.

>>> purified = defenses.create("fp").purify(model, clean, scale="default")
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.bundle import TensorBundle
from ..models import clone
from ..train import fit
from . import register, tools
from .base import Defense


def last_linear(model: nn.Module) -> str:
    """Name of the model's classifier: its last ``nn.Linear`` (``linear`` / ``classifier``)."""
    linears = tools.layers(model, nn.Linear)
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to prune")
    return list(linears)[-1]


@torch.no_grad()
def prune_levels(model: nn.Module, linear_name: str, features: torch.Tensor, labels: torch.Tensor,
                 order: torch.Tensor, step: int, max_drop: float) -> tuple[int, list[dict[str, Any]]]:
    """The clean-data rule of :func:`tools.largest_within_drop` for pruning the Linear
    layer's input channels in ``order``: try 0, step, 2*step, ... channels (at least one
    left) and keep the largest count whose accuracy on (``features``, ``labels``) -- the
    defender's clean data -- stays >= (1 - ``max_drop``) x the unpruned accuracy; stop at
    the first count that fails. Returns (count, trace)."""
    linear = dict(model.named_modules())[linear_name]
    w, b = linear.weight.float(), None if linear.bias is None else linear.bias.float()
    features, labels, order = features.to(w.device).float(), labels.to(w.device), order.to(w.device)
    channels = features.shape[1]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(channels, device=order.device)  # position of each channel in the order
    reference = None
    best, trace = 0, []
    for count in range(0, channels, step):
        keep = (rank >= count).to(features.dtype)
        acc = float((F.linear(features * keep, w, b).argmax(1) == labels).float().mean())
        if reference is None:
            reference = acc
        ok = acc >= reference * (1 - max_drop)
        trace.append({"level": count, "clean_acc": acc, "kept": ok})
        if not ok:
            break
        best = count
    return best, trace


def freeze_columns(linear: nn.Linear, channels: torch.Tensor):
    """Keep the given input columns of ``linear`` at zero under SGD (with momentum and
    weight decay) by zeroing their gradient; returns the hook handle."""
    keep = torch.ones(linear.in_features, device=linear.weight.device, dtype=linear.weight.dtype)
    keep[channels.to(keep.device)] = 0
    return linear.weight.register_hook(lambda grad: grad * keep.to(grad.dtype))


@register("fp")
@dataclass
class FinePruning(Defense):
    once_prune_ratio: float = 0.01
    acc_ratio: float = 0.1
    epochs: int | None = None
    lr: float = 0.01
    batch_size: int | None = None
    report: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    name = "fp"

    def __post_init__(self) -> None:
        if not 0 < self.once_prune_ratio <= 1:
            raise ValueError(f"once_prune_ratio must be in (0, 1], got {self.once_prune_ratio}")
        if not 0 <= self.acc_ratio < 1:
            raise ValueError(f"acc_ratio (max relative clean-accuracy drop) must be in [0, 1), got {self.acc_ratio}")
        if self.epochs is not None and self.epochs < 0:
            raise ValueError(f"epochs must be >= 0 (0 = prune only), got {self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def purify(self, model: nn.Module, clean: TensorBundle, *, scale=None, seed: int = 0, progress: bool = True) -> nn.Module:
        name = last_linear(model)
        features = tools.activations(model, clean.train_x, name, inputs=True)  # [N, C] pooled features
        channels = features.shape[1]
        order = features.mean(0).argsort()  # ascending mean activation on clean data
        step = max(1, round(self.once_prune_ratio * channels))
        count, trace = prune_levels(model, name, features, clean.train_y, order, step, self.acc_ratio)
        pruned = order[:count]

        purified = clone(model).to(clean.device)
        tools.zero_channels(purified, name, pruned)
        if self.epochs != 0:
            linear = dict(purified.named_modules())[name]
            handle = freeze_columns(linear, pruned)
            try:
                fit(purified, clean, self.recipe(scale, self.epochs, self.lr, self.batch_size), seed=seed,
                    progress=progress, desc="fp")
            finally:
                handle.remove()
            tools.zero_channels(purified, name, pruned)  # exact zeros, whatever the optimiser did
        purified.eval()
        self.report = {"layer": name, "channels": channels, "step": step, "pruned": count,
                       "pruned_channels": pruned.tolist(), "order": order.tolist(), "trace": trace}
        return purified
