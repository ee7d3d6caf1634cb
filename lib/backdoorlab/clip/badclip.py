"""BadCLIP's trigger: a patch optimised so that patched images look like the target class
to the CLIP model, in both the text and the image embedding space.

Paper: Liang, Zhu, Liu, Liu, Fang, Chang, Cao, "BadCLIP: Dual-Embedding Guided Backdoor
Attack on Multimodal Contrastive Learning", CVPR 2024. https://arxiv.org/abs/2311.12075

Threat model: the attacker knows the (pre-trained) CLIP model, optimises the patch against
it with the model frozen, then poisons a fraction of a percent of the fine-tuning pairs:
patched images paired with *natural* captions of the target class (``poisoning.poison``
with ``captions="natural"``). It has no control over training.

Objective per batch of non-target images ``x`` and target captions ``c`` (the official
code's ``embeding_optimize_patch.py``): the symmetric CLIP InfoNCE between the patched
images' embeddings and the captions' embeddings (textual alignment), plus
``triplet_weight`` x a triplet margin loss with anchor the patched-image embedding,
positive a random target-class image embedding and negative the clean embedding of the
same image (visual alignment). Adam on the patch pixels, clamped to [0, 1]; the patch is
pasted at the image centre. Defaults: patch init N(0.5, 0.25) clipped, Adam lr 1e-3 (we
use 0.01: far fewer steps), margin 1, batch 64; the paper's 16x16 patch on 224x224 images
is a 4x4 patch on our 32x32 ones (about 1.6% of the image, 0.5% in the paper).
The paper's EDA / AutoAugment on the patch-training pairs are left out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.bundle import to_float
from . import losses
from .captions import CaptionSet
from .models import ClipModel, tokenize
from .poisoning import target_captions

PATCH_SIZE = 4
LOCATIONS = ("middle", "bottom-right")


def paste(x: torch.Tensor, patch: torch.Tensor, location: str = "middle") -> torch.Tensor:
    """``patch`` (``[1, C, s, s]``, [0, 1]) pasted on every image of the batch ``x``."""
    if location not in LOCATIONS:
        raise ValueError(f"unknown patch location {location!r}; valid choices: {', '.join(LOCATIONS)}")
    s, h, w = patch.shape[-1], x.shape[-2], x.shape[-1]
    if s > min(h, w):
        raise ValueError(f"a {s}x{s} patch does not fit {h}x{w} images")
    top, left = ((h - s) // 2, (w - s) // 2) if location == "middle" else (h - s, w - s)
    out = x.clone()
    out[..., top:top + s, left:left + s] = patch.to(x.dtype).expand(len(x), x.shape[1], s, s)
    return out


def objective(model: ClipModel, x: torch.Tensor, patch: torch.Tensor, tokens: torch.Tensor,
              positives: torch.Tensor, triplet_weight: float = 1.0, margin: float = 1.0,
              location: str = "middle") -> torch.Tensor:
    """BadCLIP's loss for clean images ``x``, target-caption ``tokens`` and target-class
    image embeddings ``positives`` (one per image)."""
    patched = model.encode_image(paste(x, patch, location))
    text = model.encode_text(tokens)
    loss, _ = losses.contrastive(patched, text, model.logit_scale)
    if triplet_weight:
        with torch.no_grad():
            clean = model.encode_image(x)
        loss = loss + triplet_weight * F.triplet_margin_loss(patched, positives, clean, margin=margin)
    return loss


def optimise_patch(model: ClipModel, data: CaptionSet, target: int = 0, *, steps: int = 300, size: int = PATCH_SIZE,
                   lr: float = 0.01, batch_size: int = 64, triplet_weight: float = 1.0, margin: float = 1.0,
                   location: str = "middle", seed: int = 0) -> torch.Tensor:
    """The optimised patch ``float[1, 3, size, size]`` in [0, 1] (``model`` stays frozen)."""
    if steps < 1 or batch_size < 2 or size < 1:
        raise ValueError(f"need steps >= 1, batch_size >= 2 and size >= 1, got {steps}, {batch_size}, {size}")
    device = data.images.device
    g = torch.Generator().manual_seed(seed)
    others = torch.nonzero(data.labels.cpu() != target).squeeze(1)
    targets = torch.nonzero(data.labels.cpu() == target).squeeze(1)
    if len(others) < batch_size or len(targets) == 0:
        raise ValueError(f"need at least {batch_size} non-target and one target image, "
                         f"got {len(others)} and {len(targets)}")
    texts = target_captions(data, target, "natural", 512, seed)
    text_tokens = tokenize(texts, data.tokens.shape[1]).to(device)
    patch = (0.5 + 0.25 * torch.randn(1, 3, size, size, generator=g)).clamp(0, 1).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([patch], lr=lr)
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            rows = others[torch.randint(len(others), (batch_size,), generator=g)].to(device)
            pos = targets[torch.randint(len(targets), (batch_size,), generator=g)].to(device)
            cap = torch.randint(len(texts), (batch_size,), generator=g).to(device)
            with torch.no_grad():
                positives = model.encode_image(to_float(data.images[pos]))
            loss = objective(model, to_float(data.images[rows]), patch, text_tokens[cap], positives,
                             triplet_weight, margin, location)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                patch.clamp_(0, 1)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.train(was_training)
    return patch.detach()
