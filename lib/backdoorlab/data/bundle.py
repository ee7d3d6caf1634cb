"""``TensorBundle``: a whole dataset as uint8 tensors, resident on the compute device,
and the batched device-side augmentation used by the trainer."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass
class TensorBundle:
    """Train and test images as ``uint8[N, C, H, W]`` with ``int64`` labels.

    ``mean``/``std`` are the dataset's normalisation (applied inside the models, so
    attacks and defenses work on images in [0, 1]); ``flip`` and ``crop_padding``
    describe the training augmentation BackdoorBench uses for this dataset.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool = False
    crop_padding: int = 4
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(f"{split}_x must be uint8[N, C, H, W], got {x.dtype} {tuple(x.shape)}")
            if y.shape != (x.shape[0],):
                raise ValueError(f"{split}_y must have shape ({x.shape[0]},), got {tuple(y.shape)}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def to(self, device: Any) -> "TensorBundle":
        device = torch.device(device)
        if self.device == device:
            return self
        move = {k: getattr(self, k).to(device) for k in ("train_x", "train_y", "test_x", "test_y")}
        return replace(self, **move)

    def subset(self, train_indices: torch.Tensor | None = None, test_limit: int | None = None) -> "TensorBundle":
        """A bundle over some training samples (and optionally the first ``test_limit`` test samples)."""
        changes: dict[str, Any] = {}
        if train_indices is not None:
            idx = train_indices.to(self.device)
            changes.update(train_x=self.train_x[idx], train_y=self.train_y[idx])
        if test_limit is not None and test_limit < len(self.test_y):
            changes.update(test_x=self.test_x[:test_limit], test_y=self.test_y[:test_limit])
        return replace(self, **changes, meta={**self.meta, **({"subset": len(train_indices)} if train_indices is not None else {})})

    def __repr__(self) -> str:
        return (
            f"TensorBundle({self.name!r}, train={tuple(self.train_x.shape)}, test={tuple(self.test_x.shape)}, "
            f"classes={self.num_classes}, device={self.device})"
        )


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def augment(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding (and horizontal flip) for a whole batch at once.

    One gather over index grids: no Python loop over samples, no host sync.
    """
    n, c, h, w = x.shape
    dev = x.device
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        off_y = torch.randint(0, 2 * padding + 1, (n, 1), device=dev, generator=generator)
        off_x = torch.randint(0, 2 * padding + 1, (n, 1), device=dev, generator=generator)
        rows = off_y + torch.arange(h, device=dev)  # [n, h]
        cols = off_x + torch.arange(w, device=dev)  # [n, w]
    else:
        padded = x
        rows = torch.arange(h, device=dev).expand(n, h)
        cols = torch.arange(w, device=dev).expand(n, w)
    if flip:
        flipped = torch.rand(n, 1, device=dev, generator=generator) < 0.5
        cols = torch.where(flipped, cols.flip(1), cols)
    batch = torch.arange(n, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [n, h, w, c]
    return out.permute(0, 3, 1, 2)
