"""A clean surrogate model for attacks whose trigger is computed from a trained
network (LC's adversarial images, LF's low-frequency pattern, TrojanNN's neurons).

The surrogate is the attacker's own clean model of the scale's width, trained with the
scale's recipe on the (clean) training set, and kept in the zoo: it is trained once
per (dataset, model, width, scale, seed) and shared by every attack that needs it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .. import __version__, models, scales, zoo
from ..data.bundle import TensorBundle
from ..train import Recipe, fit


def clean_surrogate(data: TensorBundle, *, scale: Any = None, seed: int = 0, model: str = "preactresnet18",
                    width: int | None = None, progress: bool = False) -> nn.Module:
    """A clean model trained on ``data`` (loaded from the zoo when it exists), in eval mode."""
    preset = scales.get(scale)
    width = width or preset.width
    recipe = Recipe(epochs=preset.attack_epochs(data.name), batch_size=preset.batch_size)
    key = {"role": "surrogate", "dataset": data.name, "model": model, "width": width, "seed": seed,
           "recipe": recipe.key(), "n_train": len(data.train_y), "version": __version__}
    label = f"surrogate-{data.name}-{model}-w{width}-s{seed}-{preset.name}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = models.for_bundle(model, data, width).to(data.device)
    with zoo.lock(label, key):
        if zoo.exists(label, key):
            zoo.load(label, key, net)
        else:
            history = fit(net, data, recipe, seed=seed, progress=progress, desc="clean surrogate")
            zoo.save(label, key, net, {"history": dataclasses.asdict(history)})
    return net.eval()
