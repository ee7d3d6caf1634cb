"""Zero-shot accuracy and attack success rate of a CLIP model on a labelled test set."""
from __future__ import annotations

from typing import Callable

import torch

from ..data.bundle import to_float
from .captions import CaptionSet
from .models import ClipModel, ZeroShot, class_embeddings


def classifier(model: ClipModel, data: CaptionSet) -> ZeroShot:
    """``model`` as a zero-shot classifier over ``data``'s classes and prompt templates."""
    return ZeroShot(model, class_embeddings(model, data.classnames, data.templates)).eval()


@torch.no_grad()
def predict(clf: ZeroShot, images: torch.Tensor, transform: Callable | None = None,
            batch_size: int = 512) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch_size):
        x = to_float(images[i:i + batch_size])
        out.append(clf(transform(x) if transform is not None else x).argmax(1))
    return torch.cat(out)


def zero_shot(model: ClipModel, data: CaptionSet, trigger: Callable | None = None, target: int = 0,
              delta: torch.Tensor | None = None) -> dict[str, float]:
    """``acc``: zero-shot top-1 on the clean test images. With a ``trigger``: ``asr``, the
    share of *all* triggered test images classified as ``target`` (BadCLIP's convention),
    and ``asr_nontarget``, the same over the non-target images only. ``delta`` (a universal
    re-activation perturbation) is added after the trigger."""
    clf = classifier(model, data)
    y = data.test_labels
    metrics = {"acc": (predict(clf, data.test_images) == y).float().mean().item()}
    if trigger is not None:
        def poisoned(x: torch.Tensor) -> torch.Tensor:
            x = trigger(x)
            return (x + delta).clamp(0, 1) if delta is not None else x

        hit = predict(clf, data.test_images, poisoned) == target
        metrics["asr"] = hit.float().mean().item()
        metrics["asr_nontarget"] = hit[y != target].float().mean().item()
    return metrics
