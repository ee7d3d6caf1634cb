"""Training objectives shared by the trainer, attacks and defenses."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The default objective; returns (loss, logits)."""
    logits = model(x)
    return F.cross_entropy(logits.float(), y), logits
