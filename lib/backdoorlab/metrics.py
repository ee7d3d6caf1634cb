"""Backdoor metrics with BackdoorBench's definitions (all fractions in [0, 1]).

- ACC: top-1 accuracy on the clean test set.
- ASR: on the poisoned test set (test samples whose true label is not the target,
  all-to-one; every sample, all-to-all) with the trigger, accuracy against the
  attack's target labels.
- RA: the same poisoned samples, accuracy against their true labels.
- DER = [max(0, dASR) - max(0, dACC) + 1] / 2 and
  RIR = [max(0, RA_def - RA_bd) - max(0, dACC) + 1] / 2, with dASR = ASR_bd - ASR_def and
  dACC = ACC_bd - ACC_def (the accuracy drop is *subtracted*: BackdoorBench's
  "simplied" functions; its other DER adds it, a known bug).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .attacks.base import Attack
from .data.bundle import TensorBundle
from .train import predict


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).float().mean()) if len(labels) else float("nan")


def evaluate(model: nn.Module, data: TensorBundle, attack: Attack | None = None, batch_size: int = 1024) -> dict[str, float]:
    """ACC on the clean test set and, with an attack, ASR and RA on its poisoned test set."""
    result = {"acc": accuracy(predict(model, data.test_x, batch_size), data.test_y)}
    if attack is not None:
        keep = attack.test_mask(data.test_y)
        x, y = data.test_x[keep], data.test_y[keep]
        pred = predict(model, x, batch_size, transform=attack.apply)
        result["asr"] = accuracy(pred, attack.target_labels(y, data.num_classes))
        result["ra"] = accuracy(pred, y)
    return result


def der(before: Mapping[str, float], after: Mapping[str, float]) -> float:
    """Defense effectiveness rate: 1 = backdoor removed at no accuracy cost, 0.5 = no change."""
    d_asr = before["asr"] - after["asr"]
    d_acc = before["acc"] - after["acc"]
    return (max(0.0, d_asr) - max(0.0, d_acc) + 1) / 2


def rir(before: Mapping[str, float], after: Mapping[str, float]) -> float:
    """Robust improvement rate: like DER, on the recovery of true labels (RA)."""
    d_ra = after["ra"] - before["ra"]
    d_acc = before["acc"] - after["acc"]
    return (max(0.0, d_ra) - max(0.0, d_acc) + 1) / 2


def auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for the ``positive`` (poisoned) samples: the
    probability that a random positive outscores a random negative (ties count half)."""
    scores, positive = scores.float().cpu(), positive.bool().cpu()
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = torch.empty_like(scores)
    order = scores.argsort()
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float32)
    # average ranks over ties
    unique, inverse = torch.unique(scores, return_inverse=True)
    sums = torch.zeros(len(unique)).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(unique)).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    return float((ranks[positive].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def detection(scores: torch.Tensor, flagged: torch.Tensor, positive: torch.Tensor) -> dict[str, float]:
    """TPR and FPR of a detector's decisions ``flagged`` and the AUC of its ``scores``
    against the ground truth ``positive`` (poisoned)."""
    flagged, positive = flagged.bool().cpu(), positive.bool().cpu()
    tpr = float(flagged[positive].float().mean()) if positive.any() else float("nan")
    fpr = float(flagged[~positive].float().mean()) if (~positive).any() else float("nan")
    return {"tpr": tpr, "fpr": fpr, "auc": auc(scores, positive)}
