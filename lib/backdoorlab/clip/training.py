"""Training a CLIP model through the package's one trainer (``train.fit``): pre-training on
clean pairs, fine-tuning on (possibly poisoned) pairs, and CleanCLIP.

The protocol mirrors BadCLIP's and CleanCLIP's at small scale (see ``SCALES``): a tiny CLIP
is pre-trained on clean caption pairs (the stand-in for OpenAI's weights), an attacker
fine-tunes it on a pair set with a fraction of a percent of poisoned pairs, and a defender
fine-tunes the result on clean pairs (plain fine-tuning, or CleanCLIP's multimodal plus
in-modal objective). Every model is kept in the zoo, keyed by its whole lineage.

The optimiser is the official code's: AdamW (betas 0.9/0.999, weight decay 0.1, none on
biases, norm layers and the logit scale) with a per-step cosine schedule after a linear warm-up.
The warm-ups keep the papers' share of the steps (``ClipScale``), not their step counts, which
exceed a small run's whole length.
"""
from __future__ import annotations

import copy
import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .. import __version__, zoo
from ..data.bundle import augment
from ..train import Recipe, fit, steps_per_epoch
from . import losses
from .captions import CaptionSet, generate
from .models import ClipModel, create, tokenize


@dataclass(frozen=True)
class ClipScale:
    """Sizes of the CLIP protocol at one scale.

    The set sizes keep the papers' proportions loosely (a pre-training set, an attacker's
    fine-tune set with a few percent poisoned, a defender's clean set of a fifth of it). The
    learning rates do not: fine-tuning a tiny CLIP at the pre-training rate is what implants a
    backdoor from 60 poisoned pairs here (measured at ``smoke``, Blended, non-target ASR: 4
    epochs at 5e-4 gave 0.49, 10 epochs at 1e-3 gave 0.94), and what lets a defense remove it."""

    name: str
    model: str
    pretrain_pairs: int
    pretrain_epochs: int
    finetune_pairs: int  # the attacker's poisoning fine-tune set (poisoned pairs included)
    finetune_epochs: int
    defense_pairs: int  # the defender's clean pairs
    defense_epochs: int
    test_images: int
    pretrain_lr: float = 1e-3
    finetune_lr: float = 1e-3  # the papers fine-tune real CLIP at 1e-6 (attack) and 1e-5 (CleanCLIP): see above
    defense_lr: float = 1e-3
    batch_size: int = 128
    patch_steps: int = 300  # BadCLIP trigger optimisation steps
    # linear warm-up, as a share of a stage's steps: OpenAI CLIP 2,000 of ~390k iterations; BadCLIP's
    # poisoning fine-tune 10,000 of ~39k (500k pairs, batch 128, 10 epochs); CleanCLIP 50 of ~15.6k
    pretrain_warmup: float = 0.005
    finetune_warmup: float = 0.25
    defense_warmup: float = 0.003

    def poisoned_pairs(self, rate: float) -> int:
        """Poisoned pairs at ``rate`` of the fine-tune set (at least 1)."""
        return max(1, round(rate * self.finetune_pairs))


SCALES = {
    "smoke": ClipScale("smoke", "rn-micro", pretrain_pairs=4000, pretrain_epochs=25, finetune_pairs=2000,
                       finetune_epochs=10, defense_pairs=1000, defense_epochs=5, test_images=500, patch_steps=60),
    "default": ClipScale("default", "rn-micro", pretrain_pairs=20000, pretrain_epochs=15, finetune_pairs=10000,
                         finetune_epochs=10, defense_pairs=2000, defense_epochs=5, test_images=1000),
    "paper": ClipScale("paper", "rn-micro", pretrain_pairs=100000, pretrain_epochs=30, finetune_pairs=50000,
                       finetune_epochs=10, defense_pairs=10000, defense_epochs=10, test_images=2000,
                       patch_steps=1000),
}


def get_scale(scale: str | ClipScale) -> ClipScale:
    if isinstance(scale, ClipScale):
        return scale
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid choices: {', '.join(SCALES)}")
    return SCALES[scale]


def clip_loss(pairs: CaptionSet) -> Callable:
    """A ``fit`` loss: symmetric InfoNCE between the batch's images and their captions."""
    tokens = pairs.tokens

    def loss_fn(model: ClipModel, x: torch.Tensor, rows: torch.Tensor):
        image, text = model(x, tokens[rows])
        loss, logits = losses.contrastive(image, text, model.logit_scale)
        return loss, logits, torch.arange(len(rows), device=rows.device)

    return loss_fn


def clip_recipe(pairs: int, epochs: int, lr: float, batch_size: int = 128, warmup: float = 0.0) -> Recipe:
    """CLIP's training recipe for ``pairs`` pairs: AdamW (weight decay 0.1, none on biases,
    norms and the logit scale), a ``warmup`` share of the steps of linear warm-up, then cosine."""
    batch_size = min(batch_size, pairs)
    steps = epochs * steps_per_epoch(pairs, batch_size)
    return Recipe(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=0.1, optimizer="adamw",
                  schedule="warmup-cosine", warmup_steps=round(warmup * steps), decay_norms_and_biases=False)


def train_pairs(model: ClipModel, pairs: CaptionSet, epochs: int, lr: float, batch_size: int = 128, seed: int = 0,
                loss_fn: Callable | None = None, progress: bool = False, desc: str = "clip", warmup: float = 0.0):
    """Train ``model`` in place on ``pairs`` with ``clip_recipe`` and ``fit``; returns the history."""
    recipe = clip_recipe(len(pairs), epochs, lr, batch_size, warmup)
    return fit(model, pairs.as_bundle(), recipe, seed=seed, loss_fn=loss_fn or clip_loss(pairs),
               progress=progress, desc=desc)


def _cached(label: str, key: dict, build: Callable[[ClipModel], dict], scale: ClipScale, seed: int,
            start: ClipModel | None = None) -> ClipModel:
    """The model of zoo entry ``(label, key)``, trained by ``build`` from ``start`` (or a fresh
    model) when it is missing; it carries ``key`` as its ``lineage``."""
    model = copy.deepcopy(start) if start is not None else create(scale.model, seed=seed)
    with zoo.lock(label, key):
        if zoo.exists(label, key):
            zoo.load(label, key, model)
        else:
            record = build(model)
            zoo.save(label, key, model, record)
    model.lineage = key
    return model.eval()


def data_for(scale: str | ClipScale, seed: int = 0) -> CaptionSet:
    """The scale's clean pairs (pre-training + fine-tuning + defense pools, disjoint) and test set."""
    s = get_scale(scale)
    return generate(s.pretrain_pairs + s.finetune_pairs + s.defense_pairs, s.test_images, seed=seed)


def splits(data: CaptionSet, scale: str | ClipScale) -> dict[str, CaptionSet]:
    """Disjoint ``pretrain``, ``finetune`` and ``defense`` pair sets of ``data_for(scale)``."""
    s = get_scale(scale)
    bounds = {"pretrain": (0, s.pretrain_pairs),
              "finetune": (s.pretrain_pairs, s.pretrain_pairs + s.finetune_pairs),
              "defense": (s.pretrain_pairs + s.finetune_pairs, s.pretrain_pairs + s.finetune_pairs + s.defense_pairs)}
    return {k: data.select(torch.arange(a, b)) for k, (a, b) in bounds.items()}


def lineage(s: ClipScale, seed: int, **steps: Any) -> dict:
    """The zoo key of the pre-trained model of scale ``s`` (its data sizes and pre-training
    recipe, not the later stages' settings), extended by ``steps`` for the models after it."""
    return {"track": "clip", "model": s.model, "seed": seed, "version": __version__,
            "data": [s.pretrain_pairs, s.finetune_pairs, s.defense_pairs, s.test_images],
            "pretrain": clip_recipe(s.pretrain_pairs, s.pretrain_epochs, s.pretrain_lr, s.batch_size,
                                    s.pretrain_warmup).key(), **steps}


def pretrain(data: CaptionSet, scale: str | ClipScale, seed: int = 0, progress: bool = False) -> ClipModel:
    """The clean pre-trained tiny CLIP of this scale (from the zoo when it exists)."""
    s = get_scale(scale)
    pairs = splits(data, s)["pretrain"]

    def build(model: ClipModel) -> dict:
        history = train_pairs(model, pairs, s.pretrain_epochs, s.pretrain_lr, s.batch_size, seed, progress=progress,
                              desc="pretrain CLIP", warmup=s.pretrain_warmup)
        return {"history": dataclasses.asdict(history)}

    return _cached(f"clip-pretrain-{s.name}-s{seed}", lineage(s, seed), build, s, seed)


def finetune(model: ClipModel, pairs: CaptionSet, scale: str | ClipScale, step: dict, *, lr: float, epochs: int,
             seed: int = 0, loss_fn: Callable | None = None, progress: bool = False, label: str = "clip-finetune",
             warmup: float = 0.0) -> ClipModel:
    """A fine-tuned copy of ``model`` (from ``pretrain`` or an earlier ``finetune``) on ``pairs``
    (``warmup``: the share of warm-up steps), zoo-cached under the starting model's lineage plus
    ``step``, which must name everything else the result depends on (the pairs: attack,
    poisoning rate, trigger, ...)."""
    s = get_scale(scale)
    parent = getattr(model, "lineage", None)
    if parent is None:
        raise ValueError("finetune needs a model from clip.pretrain or clip.finetune (it keys the zoo on its lineage)")

    def build(m: ClipModel) -> dict:
        history = train_pairs(m, pairs, epochs, lr, s.batch_size, seed, loss_fn=loss_fn, progress=progress, desc=label,
                              warmup=warmup)
        return {"history": dataclasses.asdict(history)}

    key = {"parent": parent, **step, "recipe": clip_recipe(len(pairs), epochs, lr, s.batch_size, warmup).key()}
    return _cached(f"{label}-{s.name}-s{seed}", key, build, s, seed, start=model)


# -- CleanCLIP's augmentations ------------------------------------------------------------------
SYNONYMS = {"photo": "picture", "picture": "image", "image": "photo", "small": "little", "large": "big",
            "drawing": "sketch", "background": "backdrop", "showing": "depicting", "look": "see", "there": "here"}


def augment_text(captions: list[str], seed: int = 0, p: float = 0.1) -> list[str]:
    """One EDA-style variant per caption (no WordNet download): synonym replacement from a
    small table, then a random swap of two words, then random deletion with probability ``p``."""
    rng = random.Random(seed)
    out = []
    for caption in captions:
        words = [SYNONYMS.get(w, w) if rng.random() < 0.5 else w for w in caption.split()]
        if len(words) > 2 and rng.random() < 0.5:
            i, j = rng.sample(range(len(words)), 2)
            words[i], words[j] = words[j], words[i]
        kept = [w for w in words if rng.random() >= p]
        out.append(" ".join(kept or words))
    return out


def augment_images(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A second view of a batch: random crop (padding 3), brightness and contrast jitter,
    random grayscale and pixel noise (a batched stand-in for CleanCLIP's AutoAugment)."""
    n = len(x)
    g = generator
    x = augment(x, 3, False, g)
    bright = (torch.rand(n, 1, 1, 1, generator=g, device=g.device) - 0.5) * 0.4
    contrast = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g, device=g.device)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + bright
    gray = torch.rand(n, 1, 1, 1, generator=g, device=g.device) < 0.2
    x = torch.where(gray, x.mean(1, keepdim=True).expand_as(x), x)
    x = x + 0.03 * torch.randn(x.shape, generator=g, device=g.device)
    return x.clamp(0, 1)


def cleanclip_loss(pairs: CaptionSet, seed: int = 0, clip_weight: float = 1.0, inmodal_weight: float = 1.0
                   ) -> Callable:
    """A ``fit`` loss for CleanCLIP on ``pairs``: each caption's augmented variant is drawn
    once (seeded), each batch's second image view on the fly."""
    tokens = pairs.tokens
    tokens_aug = tokenize(augment_text(pairs.captions, seed), tokens.shape[1]).to(tokens.device)
    gen = torch.Generator(device=pairs.images.device).manual_seed(seed + 1)

    def loss_fn(model: ClipModel, x: torch.Tensor, rows: torch.Tensor):
        image, text = model(x, tokens[rows])
        image_aug, text_aug = model(augment_images(x, gen), tokens_aug[rows])
        loss, logits = losses.cleanclip(image, text, image_aug, text_aug, model.logit_scale, clip_weight,
                                        inmodal_weight)
        return loss, logits, torch.arange(len(rows), device=rows.device)

    return loss_fn
