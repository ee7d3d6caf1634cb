"""STRIP: input-level detection by the entropy of predictions on superimposed copies.

Paper: Yansong Gao, Change Xu, Derui Wang, Shiping Chen, Damith C. Ranasinghe, Surya
Nepal, "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks", ACSAC 2019,
https://arxiv.org/abs/1902.06531.

Threat model (``kind = "input"``): at inference time the defender holds the trained
(possibly backdoored) model and a small clean set; it scores each incoming input.

Method: superimpose every suspect with ``n_overlays`` images drawn at random from the
defender's clean set (a 0.5/0.5 blend, ``alpha = 0.5``), predict all of them in one
forward pass per chunk of suspects, and average the Shannon entropy (bits) of the
softmax over the overlays. A trigger keeps dominating the prediction whatever it is
blended with, so a low mean entropy is suspicious: ``score = -mean entropy`` (higher =
more suspicious).

Decision rule (the paper's): the clean set's own STRIP entropies (each clean image
superimposed with ``n_overlays`` *other* clean images) are fitted by a normal
distribution and the threshold is its ``frr`` quantile (false rejection rate 1 %); a
suspect whose entropy is below it is flagged. ``score`` computes these clean entropies
too and stores the threshold on the detector (``threshold_``, in score units), so
``flag(scores, y)`` applies it; ``flag(..., clean_scores=...)`` refits it from given clean
scores instead.

Hyperparameters: ``n_overlays`` (N = 100 in the paper; ``None`` takes 100, or 20 at
``smoke`` scale), ``alpha`` (blend weight of the
suspect, 0.5), ``frr`` (1 %), ``chunk_images`` (images per forward pass; speed only).
Deviation: the paper's code adds the two images (``cv2.addWeighted(.., 1, .., 1, 0)``);
we average them, as its text describes, so pixels stay in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import scales
from ..data.bundle import TensorBundle, to_float
from ..train import autocast
from . import register
from .base import Detector

SMOKE_OVERLAYS = 20  # N at `smoke` scale (tests): 100 overlays of every test image take minutes on a CPU


@register("strip")
@dataclass
class Strip(Detector):
    n_overlays: int | None = None  # None: the scale's (paper and default 100, smoke 20)
    alpha: float = 0.5
    frr: float = 0.01
    chunk_images: int = 256
    threshold_: float | None = field(default=None, init=False, repr=False)

    name = "strip"
    kind = "input"

    def __post_init__(self) -> None:
        if self.n_overlays is not None and self.n_overlays < 1:
            raise ValueError(f"n_overlays must be >= 1, got {self.n_overlays}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0 < self.frr < 1:
            raise ValueError(f"frr must be in (0, 1), got {self.frr}")
        if self.chunk_images < 1:
            raise ValueError(f"chunk_images must be >= 1, got {self.chunk_images}")

    @torch.no_grad()
    def entropies(self, model: nn.Module, x: torch.Tensor, pool: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
        """Mean prediction entropy (bits) of each ``x[i]`` blended with ``pool[picks[i, j]]`` over j."""
        was_training = model.training
        model.eval()
        n, k = picks.shape
        per_chunk = max(1, self.chunk_images // k)
        out = []
        for start in range(0, n, per_chunk):
            xs = to_float(x[start:start + per_chunk])
            overlays = to_float(pool[picks[start:start + per_chunk].flatten()])
            blended = self.alpha * xs.repeat_interleave(k, 0) + (1 - self.alpha) * overlays
            with autocast(blended.device):
                logits = model(blended).float()
            logp = torch.log_softmax(logits, 1)
            h = -(logp.exp() * logp).sum(1) / torch.log(torch.tensor(2.0))
            out.append(h.view(-1, k).mean(1))
        model.train(was_training)
        return torch.cat(out) if out else torch.empty(0, device=x.device)

    def overlays(self, scale: Any = None) -> int:
        """N: the parameter, else 100 (the paper's), or 20 at ``smoke`` scale."""
        if self.n_overlays is not None:
            return self.n_overlays
        return SMOKE_OVERLAYS if scales.get(scale).name == "smoke" else 100

    def clean_scores(self, model: nn.Module, clean: TensorBundle, *, seed: int = 0,
                     n_overlays: int | None = None) -> torch.Tensor:
        """STRIP scores of the defender's clean images, each blended with other clean images."""
        pool = clean.train_x
        n = len(pool)
        if n < 2:
            raise ValueError(f"STRIP needs at least 2 clean images, got {n}")
        gen = torch.Generator(device=pool.device).manual_seed(seed + 1)
        picks = torch.randint(0, n - 1, (n, n_overlays or self.overlays()), device=pool.device, generator=gen)
        picks += (picks >= torch.arange(n, device=pool.device)[:, None]).long()  # never the image itself
        return -self.entropies(model, pool, pool, picks)

    def threshold(self, clean_scores: torch.Tensor) -> float:
        """Score above which an input is flagged: the normal fit of the clean entropies at FRR ``frr``."""
        h = -clean_scores.float()
        mean, std = h.mean(), h.std().clamp_min(1e-12)
        return float(-torch.distributions.Normal(mean, std).icdf(torch.tensor(self.frr)))

    def score(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, clean: TensorBundle, *,
              seed: int = 0, scale: Any = None) -> torch.Tensor:
        pool = clean.train_x
        if len(pool) < 1:
            raise ValueError("STRIP needs the defender's clean images to superimpose")
        n_overlays = self.overlays(scale)
        self.threshold_ = self.threshold(self.clean_scores(model, clean, seed=seed, n_overlays=n_overlays))
        gen = torch.Generator(device=pool.device).manual_seed(seed)
        picks = torch.randint(0, len(pool), (len(x), n_overlays), device=pool.device, generator=gen)
        return -self.entropies(model, x.to(pool.device), pool, picks)

    def flag(self, scores: torch.Tensor, y: torch.Tensor | None = None,
             clean_scores: torch.Tensor | None = None) -> torch.Tensor:
        threshold = self.threshold(clean_scores) if clean_scores is not None else self.threshold_
        if threshold is None:
            raise ValueError("no STRIP threshold yet: call score(...) first (it fits the threshold on the clean "
                             "images) or pass clean_scores")
        return scores > threshold
