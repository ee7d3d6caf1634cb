"""CLIP's contrastive objective and CleanCLIP's in-modal self-supervised term."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE between L2-normalised embeddings ``a[i]`` and ``b[i]`` (in-batch
    negatives): ``(CE(s a b^T, i) + CE(s b a^T, i)) / 2``; returns ``(loss, logits a->b)``."""
    logits = scale * a @ b.T
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2, logits


def cleanclip(image: torch.Tensor, text: torch.Tensor, image_aug: torch.Tensor, text_aug: torch.Tensor,
              scale: torch.Tensor | float, clip_weight: float = 1.0, inmodal_weight: float = 1.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """CleanCLIP (Bansal et al., ICCV 2023): ``clip_weight`` x the multimodal loss plus
    ``inmodal_weight`` x the mean of the image-to-augmented-image and text-to-augmented-text
    InfoNCE losses (all scaled by CLIP's logit scale, as in the official code)."""
    multimodal, logits = contrastive(image, text, scale)
    image_self, _ = contrastive(image, image_aug, scale)
    text_self, _ = contrastive(text, text_aug, scale)
    return clip_weight * multimodal + inmodal_weight * (image_self + text_self) / 2, logits
