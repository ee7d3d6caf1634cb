"""Trigger images from pictures that installed packages ship (no downloads)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

NATURAL_IMAGES = ("flower", "china")  # scikit-learn's bundled sample photos


def natural_image(name: str, channels: int, height: int, width: int) -> torch.Tensor:
    """A bundled photo as ``float[C, H, W]`` in [0, 1], resized (antialiased) to H x W;
    grey (ITU-R 601 luma) when ``channels == 1``."""
    if name not in NATURAL_IMAGES:
        raise ValueError(f"unknown pattern image {name!r}; valid choices: {', '.join(NATURAL_IMAGES)}")
    from sklearn.datasets import load_sample_image

    img = torch.from_numpy(np.asarray(load_sample_image(f"{name}.jpg"), dtype=np.float32) / 255.0)
    img = img.permute(2, 0, 1)[None]
    img = F.interpolate(img, size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]
    if channels == 1:
        img = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]
    elif channels != 3:
        raise ValueError(f"pattern images support 1 or 3 channels, got {channels}")
    return img.clamp_(0, 1)
