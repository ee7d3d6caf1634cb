"""The ``Detector`` base class: backdoor *detection* rather than removal.

Two threat models:

- ``kind = "dataset"`` (AC, Spectral signatures): the defender scans the training set it
  was given, poisoned samples unknown, with the model trained on it.
- ``kind = "input"`` (STRIP): at inference time the defender scores each incoming input,
  holding the trained model and a few clean samples.

``score`` returns one suspicion score per suspect (higher = more likely poisoned), for
AUC; ``flag`` applies the method's own decision rule, for TPR/FPR. Both see only the
model, the suspects (with the labels they carry) and the defender's clean data.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..data.bundle import TensorBundle


@dataclass
class Detector:
    name: ClassVar[str] = "detector"
    kind: ClassVar[str] = "dataset"  # or "input"

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def score(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean: TensorBundle, *,
              seed: int = 0, scale: Any = None) -> torch.Tensor:
        """Suspicion scores ``float[N]`` for suspects ``x`` (uint8 images) with labels ``y``."""
        raise NotImplementedError

    def flag(self, scores: torch.Tensor, y: torch.Tensor, clean_scores: torch.Tensor | None = None) -> torch.Tensor:
        """``bool[N]``: the suspects the method's decision rule rejects."""
        raise NotImplementedError
