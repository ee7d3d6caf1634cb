"""CLIP models through ``open_clip``: a tiny configuration trained offline here, or real
pretrained weights (``pretrained="openai"`` ...) for a user who has them.

``ClipModel`` wraps an ``open_clip`` model so it follows the package's conventions: it takes
images in [0, 1] (any size; it resizes to the tower's input and normalises with the CLIP
mean/std itself) and token tensors from ``tokenize``. ``ZeroShot`` turns it into an image
classifier (logits = scaled cosine similarity with averaged prompt embeddings), so every
classifier tool of the package (metrics, re-activation) runs on a CLIP model unchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

CONTEXT_LENGTH = 32  # tokens per caption for the tiny configurations (real CLIP: 77)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Tiny open_clip configurations: a ViT image tower on 32x32 images and a causal text
# transformer over the real CLIP BPE vocabulary (so captions tokenise as for real CLIP).
CONFIGS = {
    "tiny": dict(embed_dim=128,
                 vision_cfg=dict(image_size=32, patch_size=4, width=128, layers=4, head_width=32, mlp_ratio=2.0),
                 text_cfg=dict(context_length=CONTEXT_LENGTH, vocab_size=49408, width=128, heads=4, layers=4,
                               mlp_ratio=2.0)),
    "rn-micro": dict(embed_dim=64, vision_cfg=dict(image_size=32, layers=(1, 1, 1, 1), width=32),
                     text_cfg=dict(context_length=CONTEXT_LENGTH, vocab_size=49408, width=64, heads=2, layers=2,
                                   mlp_ratio=2.0)),
    "micro": dict(embed_dim=64,
                  vision_cfg=dict(image_size=32, patch_size=4, width=64, layers=2, head_width=32, mlp_ratio=2.0),
                  text_cfg=dict(context_length=CONTEXT_LENGTH, vocab_size=49408, width=64, heads=2, layers=2,
                                mlp_ratio=2.0)),
}


class PretrainedNotAvailable(RuntimeError):
    """Real CLIP weights were asked for but could not be fetched or found."""


def _open_clip():
    try:
        import open_clip
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("the CLIP track needs open_clip: pip install 'backdoorlab[clip]'") from err
    return open_clip


class ClipModel(nn.Module):
    """An ``open_clip`` CLIP taking [0, 1] images; ``encode_*`` return L2-normalised embeddings."""

    def __init__(self, net: nn.Module, name: str, context_length: int,
                 mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD):
        super().__init__()
        self.net, self.name, self.context_length = net, name, context_length
        size = net.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.net.logit_scale.exp().clamp(max=100)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False).clamp(0, 1)
        return F.normalize(self.net.encode_image((x - self.mean) / self.std), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embeddings of ``tokens``; shorter token rows (the tiny track's 32) are zero-padded to
        the model's context length, so caption sets tokenised once serve real CLIP (77) too."""
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"{tokens.shape[1]} tokens per caption exceed {self.name}'s context of "
                             f"{self.context_length}")
        tokens = F.pad(tokens, (0, self.context_length - tokens.shape[1]))
        return F.normalize(self.net.encode_text(tokens), dim=-1)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(x), self.encode_text(tokens)


def create(name: str = "tiny", pretrained: str | None = None, seed: int = 0) -> ClipModel:
    """A CLIP model: ``"tiny"``/``"micro"`` (built here, random init from ``seed``) or any
    ``open_clip`` architecture (e.g. ``"RN50"``, ``"ViT-B-32"``) with ``pretrained`` weights
    (e.g. ``"openai"``), which needs them downloaded or cached."""
    open_clip = _open_clip()
    if name in CONFIGS:
        if pretrained:
            raise ValueError(f"{name!r} is trained here; it has no pretrained weights (got pretrained={pretrained!r})")
        from open_clip.model import CLIP

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = CLIP(**CONFIGS[name])
        return ClipModel(net, name, CONTEXT_LENGTH)
    if name not in open_clip.list_models():
        raise ValueError(f"unknown CLIP model {name!r}; valid choices: {', '.join(CONFIGS)}, "
                         "or an open_clip architecture such as RN50, ViT-B-32")
    try:
        net = open_clip.create_model(name, pretrained=pretrained)
    except Exception as err:  # network or cache failure: say what to do
        raise PretrainedNotAvailable(
            f"could not load open_clip {name!r} with pretrained={pretrained!r} ({type(err).__name__}: {err}). "
            "The weights are downloaded from the internet on first use; on an offline machine put them in the "
            "open_clip/Hugging Face cache first, or use the offline model clip.create('tiny')") from err
    cfg = getattr(net.visual, "preprocess_cfg", {}) or {}
    return ClipModel(net, name, 77, cfg.get("mean", OPENAI_MEAN), cfg.get("std", OPENAI_STD))


def tokenize(texts: Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """CLIP BPE tokens ``int64[len(texts), context_length]`` (the vocabulary ships with open_clip)."""
    open_clip = _open_clip()
    return open_clip.get_tokenizer("RN50")(list(texts), context_length=context_length)


@torch.no_grad()
def class_embeddings(model: ClipModel, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """``float[K, D]``: each class's prompt embeddings averaged over ``templates`` and re-normalised."""
    device = next(model.parameters()).device
    texts = [t.format(c) for c in classnames for t in templates]
    emb = model.encode_text(tokenize(texts, model.context_length).to(device))
    return F.normalize(emb.view(len(classnames), len(templates), -1).mean(1), dim=-1)


class ZeroShot(nn.Module):
    """A CLIP model as a ``K``-way image classifier over fixed class embeddings."""

    def __init__(self, model: ClipModel, weights: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("weights", weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.logit_scale * self.model.encode_image(x) @ self.weights.T
