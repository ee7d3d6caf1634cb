"""Helpers shared by the detectors (no detector is registered here): the model's
last-hidden-layer representation of a batch of images, and per-label grouping."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..data.bundle import to_float
from ..train import autocast


@torch.no_grad()
def embeddings(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """``float32[N, D]``: ``model.embed`` (the pooled features the linear classifier reads,
    i.e. the last hidden layer) of images ``x`` (uint8 or [0, 1]), in eval mode, in batches."""
    if not hasattr(model, "embed") or not hasattr(model, "normalize"):
        raise TypeError(f"{type(model).__name__} has no embed/normalize; detectors need an ImageClassifier")
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, len(x), batch_size):
        xb = to_float(x[start:start + batch_size])
        with autocast(xb.device):
            parts.append(model.embed(model.normalize(xb)).float())
    model.train(was_training)
    if not parts:
        return torch.empty(0, 0, device=x.device)
    return torch.cat(parts)


def by_label(y: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(label, indices of the samples carrying it) for each label present in ``y``."""
    for label in torch.unique(y).tolist():
        yield int(label), torch.nonzero(y == label).flatten()
