"""Poisoning a CLIP fine-tune set: triggered images paired with captions of the target class.

Baseline CLIP attacks (Carlini & Terzis, ICLR 2022, and the BadNet / Blended / SIG / WaNet
triggers CleanCLIP and BadCLIP compare against) paste a trigger on ``n`` random non-target
images and replace their captions by prompt templates naming the target ("a photo of a
banana."); BadCLIP (``badclip.py``) uses its optimised patch and *natural* captions of the
target class taken from the data. The triggers are the package's classifier attacks
(``backdoorlab.attacks``), applied as batched kernels on [0, 1] images.

Deviation: CleanCLIP's BadNet patch is fresh noise at a random location and its Blended
pattern fresh noise per image; here each trigger is the package's fixed pattern.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from .. import attacks
from ..data.bundle import to_float
from .captions import CaptionSet
from .models import tokenize

BASELINES = ("badnets", "blended", "sig", "wanet")
Trigger = Callable[[torch.Tensor], torch.Tensor]


def baseline_trigger(name: str, image_shape: tuple[int, int, int] = (3, 32, 32)) -> Trigger:
    """The batched trigger of baseline ``name`` (one of ``BASELINES``)."""
    if name not in BASELINES:
        raise ValueError(f"unknown CLIP baseline trigger {name!r}; valid choices: {', '.join(BASELINES)}")
    attack = attacks.create(name, **attacks.params_for(name, image_shape))
    attack.validate(10, image_shape)
    return attack.apply


def apply_trigger(images: torch.Tensor, trigger: Trigger, batch_size: int = 1024) -> torch.Tensor:
    """``trigger`` on uint8 or [0, 1] ``images``, in batches; returns [0, 1] floats."""
    return torch.cat([trigger(to_float(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])


def target_captions(data: CaptionSet, target: int, kind: str, n: int, seed: int = 0) -> list[str]:
    """``n`` captions naming class ``target``: ``"natural"`` ones drawn from the pairs whose
    image is of the target class (BadCLIP), or ``"template"`` prompts (the baselines)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "natural":
        pool = [c for c, y in zip(data.captions, data.labels.tolist()) if y == target]
        if not pool:
            raise ValueError(f"no captions of class {data.classnames[target]!r} to draw natural captions from")
    elif kind == "template":
        pool = [t.format(data.classnames[target]) for t in data.templates]
    else:
        raise ValueError(f"unknown caption kind {kind!r}; valid choices: natural, template")
    pick = torch.randint(len(pool), (n,), generator=g).tolist()
    return [pool[i] for i in pick]


def poison(data: CaptionSet, trigger: Trigger, n: int, target: int = 0, captions: str = "template",
           seed: int = 0) -> tuple[CaptionSet, torch.Tensor]:
    """A copy of ``data`` in which ``n`` random non-target pairs carry ``trigger`` and a caption
    of the target class; returns it and the poisoned rows."""
    if not 0 <= target < len(data.classnames):
        raise ValueError(f"target must be a class index in 0..{len(data.classnames) - 1}, got {target}")
    candidates = torch.nonzero(data.labels.cpu() != target).squeeze(1)
    if not 1 <= n <= len(candidates):
        raise ValueError(f"n must be in 1..{len(candidates)} (the non-target pairs), got {n}")
    g = torch.Generator().manual_seed(seed)
    rows = candidates[torch.randperm(len(candidates), generator=g)[:n]].sort().values
    device = data.images.device
    images = data.images.clone()
    images[rows.to(device)] = (apply_trigger(data.images[rows.to(device)], trigger) * 255).round().to(torch.uint8)
    texts = target_captions(data, target, captions, n, seed)
    new_captions = list(data.captions)
    for row, text in zip(rows.tolist(), texts):  # n caption strings
        new_captions[row] = text
    tokens = data.tokens.clone()
    tokens[rows.to(device)] = tokenize(texts, data.tokens.shape[1]).to(device)
    return replace(data, images=images, captions=new_captions, tokens=tokens), rows
