"""Tiny models and data for fast mechanism tests of defenses (seconds, no training)."""
import torch

from backdoorlab import data, models


def tiny_model(seed: int = 0, name: str = "preactresnet18"):
    """A width-4 four-class model on one-channel images, in eval mode."""
    torch.manual_seed(seed)
    return models.create(name, 4, 1, width=4).eval()


def tiny_bundle(n: int = 24) -> data.TensorBundle:
    """``n`` random 1x12x12 images in four classes (the first four double as the test split)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 1, 12, 12), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % 4
    return data.TensorBundle("tiny", x, y, x[:4].clone(), y[:4].clone(), 4, (0.5,), (0.25,))
