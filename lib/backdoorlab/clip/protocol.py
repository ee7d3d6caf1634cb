"""The BadCLIP / CleanCLIP protocol in three calls, shared by the notebook and the tests:
``trigger_for`` (a baseline trigger, or BadCLIP's patch optimised against the pre-trained
model), ``backdoor`` (poison the attacker's fine-tune pairs and fine-tune on them) and
``defend`` (plain clean fine-tuning or CleanCLIP on the defender's clean pairs). Every model
is zoo-cached under its lineage, so a notebook and a test asking for the same model train it once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import badclip, poisoning, training
from .captions import CaptionSet
from .models import ClipModel

ATTACKS = ("badclip", *poisoning.BASELINES)
DEFENSES = ("finetune", "cleanclip")


@dataclass
class Trigger:
    """An attack's batched trigger on [0, 1] images, the caption kind its poisoned pairs get,
    and the optimised patch (BadCLIP) that the zoo key must name."""

    name: str
    apply: Callable[[torch.Tensor], torch.Tensor]
    captions: str
    patch: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x)


def check(attacks: list[str] | tuple[str, ...] = (), defenses: list[str] | tuple[str, ...] = ()) -> None:
    """A clear error for an unknown attack or defense name."""
    for name in attacks:
        if name not in ATTACKS:
            raise ValueError(f"unknown CLIP attack {name!r}; valid choices: {', '.join(ATTACKS)}")
    for name in defenses:
        if name not in DEFENSES:
            raise ValueError(f"unknown CLIP defense {name!r}; valid choices: {', '.join(DEFENSES)}")


def trigger_for(name: str, pretrained: ClipModel, pairs: CaptionSet, target: int = 0,
                scale: str | training.ClipScale = "default", seed: int = 0) -> Trigger:
    """The trigger of attack ``name``; BadCLIP's patch is optimised on ``pairs`` against ``pretrained``."""
    check([name])
    if name == "badclip":
        patch = badclip.optimise_patch(pretrained, pairs, target, steps=training.get_scale(scale).patch_steps,
                                       seed=seed)
        return Trigger(name, lambda x: badclip.paste(x, patch), "natural", patch)
    return Trigger(name, poisoning.baseline_trigger(name), "template")


def backdoor(pretrained: ClipModel, pairs: CaptionSet, trigger: Trigger, scale: str | training.ClipScale,
             rate: float, target: int = 0, seed: int = 0) -> ClipModel:
    """``pretrained`` fine-tuned on ``pairs`` with ``rate`` of them poisoned by ``trigger``."""
    s = training.get_scale(scale)
    if not 0 < rate < 1:
        raise ValueError(f"poison rate must be in (0, 1), got {rate}")
    poisoned, _ = poisoning.poison(pairs, trigger, s.poisoned_pairs(rate), target, trigger.captions, seed)
    step = dict(attack=trigger.name, rate=rate, target=target,
                patch=None if trigger.patch is None else trigger.patch.flatten().tolist())
    return training.finetune(pretrained, poisoned, s, step, lr=s.finetune_lr, epochs=s.finetune_epochs, seed=seed,
                             label=f"clip-{trigger.name}", warmup=s.finetune_warmup)


def defend(model: ClipModel, pairs: CaptionSet, defense: str, scale: str | training.ClipScale,
           seed: int = 0) -> ClipModel:
    """``model`` fine-tuned on the clean ``pairs`` by ``defense`` (``finetune`` or ``cleanclip``)."""
    check(defenses=[defense])
    s = training.get_scale(scale)
    loss_fn = training.cleanclip_loss(pairs, seed) if defense == "cleanclip" else None
    attack = getattr(model, "lineage", {}).get("attack", "clean")
    return training.finetune(model, pairs, s, {"defense": defense}, lr=s.defense_lr, epochs=s.defense_epochs,
                             seed=seed, loss_fn=loss_fn, label=f"clip-{attack}-{defense}", warmup=s.defense_warmup)
