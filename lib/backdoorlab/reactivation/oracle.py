"""EP, exact purification: the oracle defense of Min et al. (NeurIPS 2024, "Uncovering,
Explaining, and Mitigating the Superficial Safety of Backdoor Defense").

The defender is assumed to know the trigger: it fine-tunes the backdoored model on its
clean subset plus triggered copies of the subset's non-target images that keep their
*true* labels, so the trigger is explicitly unlearnt. No real defender has this; the paper
uses EP as the reference for a backdoor that is really gone (its P-ASR stays low under the
retuning attack and its path from the backdoored model rises early). Not registered as a
defense, since it needs the attack. The paper's exact EP recipe is not published (the
official repository has no EP script): here the defenses' fine-tuning recipe at ``scale``
(BackdoorBench's SGD lr 0.01, momentum 0.9, wd 5e-4, cosine; the preset's defense epochs).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import data, metrics, scales
from ..data.bundle import to_float
from ..models import clone
from ..train import Recipe, fit

if TYPE_CHECKING:  # pragma: no cover
    from ..pipeline import AttackResult


def exact_purification(result: "AttackResult", *, clean_ratio: float = 0.05, epochs: int | None = None,
                       lr: float = 0.01, seed: int = 0, progress: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The EP oracle on ``result.model`` (left unchanged): the purified copy and its metrics
    row (``acc``, ``asr``, ``ra``, ``clean_samples``, ``triggered_samples``)."""
    if result.attack is None:
        raise ValueError("exact purification needs an attacked setting (attack='none' has no trigger)")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1 or None (the scale's defense epochs), got {epochs}")
    attack, bundle = result.attack, result.data
    preset = scales.get(result.setting.scale)
    subset = bundle.subset(data.clean_subset(bundle, clean_ratio, seed=result.setting.seed))
    keep = attack.test_mask(subset.train_y)
    triggered = attack.apply(to_float(subset.train_x[keep])).mul(255).round_().clamp_(0, 255).to(torch.uint8)
    train = dataclasses.replace(subset, train_x=torch.cat([subset.train_x, triggered]),
                                train_y=torch.cat([subset.train_y, subset.train_y[keep]]))
    recipe = Recipe(epochs=epochs or preset.defense_epochs, lr=lr, batch_size=preset.defense_batch_size)
    model = clone(result.model)
    fit(model, train, recipe, seed=seed, progress=progress, desc="EP oracle")
    model.eval()
    row = {**metrics.evaluate(model, bundle, attack), "clean_samples": len(subset.train_y),
           "triggered_samples": int(keep.sum())}
    return model, row


__all__ = ["exact_purification"]
