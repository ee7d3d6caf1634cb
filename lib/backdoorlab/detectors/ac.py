"""Activation Clustering (AC): training-set detection by 2-means on each label's
last-hidden-layer activations.

Paper: Bryant Chen, Wilka Carvalho, Nathalie Baracaldo, Heiko Ludwig, Benjamin Edwards,
Taesung Lee, Ian Molloy, Biplav Srivastava, "Detecting Backdoor Attacks on Deep Neural
Networks by Activation Clustering", AAAI SafeAI workshop 2019, https://arxiv.org/abs/1811.03728.

Threat model (``kind = "dataset"``): the defender holds the poisoned training set it was
given (poisoned samples unknown) and the model trained on it.

Method: per label, the activations of the last hidden layer (``model.embed``) are centred
and reduced to ``n_dims = 10`` dimensions, then split into 2 clusters by k-means
(batched Lloyd iterations from ``restarts`` k-means++ seeds; the lowest inertia wins).
Deviation: the paper reduces with FastICA; we use PCA *whitening* (top ``n_dims`` left
singular vectors of the centred activations, unit variance, ``whiten=True``). FastICA
output is the whitened PCA projection times an orthogonal rotation, and k-means with
Euclidean distance is rotation invariant, so the clustering is the same as with ICA
up to ICA's convergence; ``whiten=False`` keeps the raw PCA coordinates.

Decision rule: the paper's relative-size and silhouette analyses combined. In each label,
the *smaller* cluster is flagged when it holds at most ``size_threshold`` of the label and
the label's mean silhouette is at least ``silhouette_threshold`` (0.1; clean labels also
split in two, but into overlapping parts with lower silhouette). Deviation: the paper's
relative-size rule uses 35 %; the default here is 50 % (= always the smaller cluster of a
well-separated label), because BackdoorBench's ``pratio 0.1`` of the whole training set
makes about half of the all-to-one target label poison, and a 35 % cap then flags
nothing in many runs (BackdoorBench's ``cluster_analysis: smaller`` flags the smaller
cluster of every label, without the silhouette test). Pass ``size_threshold=0.35`` for
the paper's rule.

Score (for AUC): ``max(silhouette_l, 0) * (1 - fraction of the label in the sample's
cluster)``: high for members of a small, well-separated cluster.
"""
from __future__ import annotations

from typing import Any

from dataclasses import dataclass

import torch
from torch import nn

from ..data.bundle import TensorBundle
from . import register
from .base import Detector
from .features import by_label, embeddings


def kmeans2(points: torch.Tensor, restarts: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """2-means of ``points [n, d]``: ``restarts`` k-means++ seeds run as one batched Lloyd
    iteration; returns the assignment (``int64[n]`` in {0, 1}) of the lowest-inertia run."""
    n = len(points)
    dev = points.device
    first = torch.randint(0, n, (restarts,), device=dev, generator=generator)
    d2 = torch.cdist(points[first], points).square()  # [R, n]
    second = torch.multinomial(d2 + 1e-12, 1, generator=generator).squeeze(1)
    centres = torch.stack([points[first], points[second]], 1)  # [R, 2, d]
    for _ in range(iters):
        assign = torch.cdist(centres, points[None].expand(restarts, -1, -1)).argmin(1)  # [R, n]
        onehot = torch.nn.functional.one_hot(assign, 2).float()  # [R, n, 2]
        counts = onehot.sum(1)  # [R, 2]
        sums = onehot.transpose(1, 2) @ points  # [R, 2, d]
        centres = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centres)
    dist = torch.cdist(centres, points[None].expand(restarts, -1, -1))  # [R, 2, n]
    best_dist, assign = dist.min(1)
    inertia = best_dist.square().sum(1)
    return assign[inertia.argmin()]


def silhouette(points: torch.Tensor, assign: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Mean silhouette coefficient of a 2-cluster assignment (exact, in row chunks);
    members of a singleton cluster count 0, as in scikit-learn."""
    counts = torch.bincount(assign, minlength=2).float()
    if (counts == 0).any():
        return torch.zeros((), device=points.device)
    onehot = torch.nn.functional.one_hot(assign, 2).float()
    total = torch.zeros((), device=points.device)
    for start in range(0, len(points), chunk):
        d = torch.cdist(points[start:start + chunk], points)  # [c, n]
        sums = d @ onehot  # [c, 2]
        own = assign[start:start + chunk]
        own_count = counts[own]
        a = sums.gather(1, own[:, None]).squeeze(1) / (own_count - 1).clamp_min(1)
        b = sums.gather(1, (1 - own)[:, None]).squeeze(1) / counts[1 - own]
        s = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
        total += torch.where(own_count > 1, s, torch.zeros_like(s)).sum()
    return total / len(points)


@register("ac")
@dataclass
class ActivationClustering(Detector):
    n_dims: int = 10
    restarts: int = 10
    iters: int = 50
    size_threshold: float = 0.5
    silhouette_threshold: float = 0.1
    whiten: bool = True

    name = "ac"
    kind = "dataset"

    def __post_init__(self) -> None:
        if self.n_dims < 1:
            raise ValueError(f"n_dims must be >= 1, got {self.n_dims}")
        if self.restarts < 1 or self.iters < 1:
            raise ValueError(f"restarts and iters must be >= 1, got {self.restarts}, {self.iters}")
        if not 0 < self.size_threshold <= 0.5:
            raise ValueError(f"size_threshold must be in (0, 0.5], got {self.size_threshold}")
        if not -1 <= self.silhouette_threshold <= 1:
            raise ValueError(f"silhouette_threshold must be in [-1, 1], got {self.silhouette_threshold}")

    def analyse(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int = 0) -> dict[str, torch.Tensor]:
        """Per sample: its cluster's fraction of the label (``fraction``), whether it is in the
        label's smaller cluster (``smaller``) and the label's silhouette (``silhouette``)."""
        reps = embeddings(model, x)
        dev = reps.device
        y = y.to(dev)
        gen = torch.Generator(device=dev).manual_seed(seed)
        fraction = torch.ones(len(x), device=dev)
        smaller = torch.zeros(len(x), dtype=torch.bool, device=dev)
        sil = torch.zeros(len(x), device=dev)
        for _, idx in by_label(y):
            if len(idx) < 3:
                continue
            centred = reps[idx] - reps[idx].mean(0, keepdim=True)
            u, sv, _ = torch.linalg.svd(centred, full_matrices=False)
            k = min(self.n_dims, len(sv))
            reduced = u[:, :k] * (len(idx) - 1) ** 0.5 if self.whiten else u[:, :k] * sv[:k]
            assign = kmeans2(reduced, self.restarts, self.iters, gen)
            counts = torch.bincount(assign, minlength=2).float()
            frac = counts / len(idx)
            fraction[idx] = frac[assign]
            smaller[idx] = assign == counts.argmin()
            sil[idx] = silhouette(reduced, assign)
        return {"fraction": fraction, "smaller": smaller, "silhouette": sil}

    def score(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean: TensorBundle | None = None, *,
              seed: int = 0, scale: Any = None) -> torch.Tensor:
        a = self.analyse(model, x, y, seed=seed)
        self.last_analysis_ = a
        return a["silhouette"].clamp_min(0) * (1 - a["fraction"])

    def flag(self, scores: torch.Tensor, y: torch.Tensor, clean_scores: torch.Tensor | None = None) -> torch.Tensor:
        """Members of the smaller cluster (at most ``size_threshold`` of its label) of a label
        whose silhouette is at least ``silhouette_threshold``. Reads both back from the score:
        ``fraction = 1 - score / silhouette`` is not invertible for silhouette 0, so the rule
        is applied to the analysis ``score`` stored."""
        a = getattr(self, "last_analysis_", None)
        if a is None or len(a["fraction"]) != len(scores):
            raise ValueError("call score(...) on the same suspects before flag(...)")
        return (a["smaller"] & (a["fraction"] <= self.size_threshold)
                & (a["silhouette"] >= self.silhouette_threshold)).to(scores.device)
