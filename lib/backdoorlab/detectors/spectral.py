"""Spectral Signatures: training-set detection by the top singular direction of each
label's representations.

Paper: Brandon Tran, Jerry Li, Aleksander Madry, "Spectral Signatures in Backdoor
Attacks", NeurIPS 2018, https://arxiv.org/abs/1811.00636.

Threat model (``kind = "dataset"``): the defender holds the poisoned training set it was
given (poisoned samples unknown) and the model trained on it.

Method: for every label, take the last-hidden-layer representations (``model.embed``,
the pooled features the classifier reads; BackdoorBench uses the same layer), centre
them on the label's mean, find the top right singular vector ``v`` of the centred matrix
and score each sample by its squared projection ``<r_i - mean, v>^2`` (the paper's
outlier score). Decision rule (the paper's Algorithm 1): in *every* label, remove the
``1.5 * eps`` fraction with the highest scores, ``eps`` being the defender's upper bound
on the number of poisoned samples (``eps = 0.1`` here, so 15 % per label: BackdoorBench's
``percentile: 85``). With an all-to-one attack only the target label holds poison, so the
rule also removes 15 % of every clean label by design: expect FPR ~ 0.15 and TPR near 1
when the signature is strong.

Hyperparameters: ``eps`` (expected poison ratio, in (0, 0.66]); ``removal_factor`` (1.5,
the paper's multiplier). ``score`` values are comparable within a label (raw squared
projections, as in the paper); the dataset-wide AUC pools them across labels.
"""
from __future__ import annotations

from typing import Any

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..data.bundle import TensorBundle
from . import register
from .base import Detector
from .features import by_label, embeddings


@register("spectral")
@dataclass
class SpectralSignatures(Detector):
    eps: float = 0.1
    removal_factor: float = 1.5

    name = "spectral"
    kind = "dataset"

    def __post_init__(self) -> None:
        if not 0 < self.eps <= 1:
            raise ValueError(f"eps (expected poison ratio) must be in (0, 1], got {self.eps}")
        if not self.removal_factor > 0 or self.eps * self.removal_factor > 1:
            raise ValueError(f"removal_factor must be > 0 with eps * removal_factor <= 1, got {self.removal_factor}"
                             f" (eps {self.eps})")

    def score(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean: TensorBundle | None = None, *,
              seed: int = 0, scale: Any = None) -> torch.Tensor:
        reps = embeddings(model, x)
        scores = torch.zeros(len(x), device=reps.device)
        for _, idx in by_label(y.to(reps.device)):
            if len(idx) < 2:
                continue
            centred = reps[idx] - reps[idx].mean(0, keepdim=True)
            _, _, vh = torch.linalg.svd(centred, full_matrices=False)
            scores[idx] = (centred @ vh[0]).square()
        return scores

    def flag(self, scores: torch.Tensor, y: torch.Tensor, clean_scores: torch.Tensor | None = None) -> torch.Tensor:
        """The top ``removal_factor * eps`` fraction (rounded down) of each label's scores."""
        y = y.to(scores.device)
        flagged = torch.zeros(len(scores), dtype=torch.bool, device=scores.device)
        for _, idx in by_label(y):
            k = math.floor(self.removal_factor * self.eps * len(idx))
            if k > 0:
                flagged[idx[scores[idx].topk(k).indices]] = True
        return flagged
