"""WaNet: a fixed, smooth, nearly invisible warp of the image is the trigger.

Paper: Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021.
https://arxiv.org/abs/2102.10369

Threat model: training-controlled. The attacker runs the training code: in every batch
the pre-drawn poisoned samples are warped and relabelled to the target, and an extra
``cross_ratio`` times as many clean samples ("noise mode") are warped with the grid
*plus random noise* and keep their true labels, so the network learns the exact warp,
not warping in general. At test time ``apply`` warps with the fixed grid.

The warp: a random ``k x k`` field of 2-D offsets in [-1, 1] (normalised by its mean
absolute value) is upsampled bicubically to ``H x W``; the sampling grid is
``identity + s * field / H`` (times ``grid_rescale``, clamped to [-1, 1]) and images are
resampled with ``F.grid_sample`` (bilinear, ``align_corners=True``), the whole batch at
once. The field is drawn in ``prepare`` from the seed and saved with the attacked model.

Hyperparameters (BackdoorBench defaults): ``k`` 4, ``s`` 0.5, ``grid_rescale`` 1,
``cross_ratio`` 2 (noise-mode samples = 2 x the poisoned ones in each batch); target 0,
all-to-one, pratio 0.1. Differences from BackdoorBench: it also applies RandomRotation(10)
and RandomCrop(pad 5) after poisoning, and uses MultiStepLR; here the trainer's own
device augmentation (random crop with the dataset's padding, flip where used) and
schedule apply. WaNet is known to need many epochs: on mnist5k the defaults reach ASR
0.97 at ``default`` (12 epochs) but ~0.04 at ``smoke`` (4 epochs). The noise mode is what
4 epochs cannot learn (s = 4 or 8 with it: ASR 0.4-0.5); ``smoke_params`` (s = 2, no
noise mode), used by the tests and every ``smoke`` run, is learnt (ASR ~0.99).

>>> attack = WaNet(k=4, s=0.5)
>>> attack.prepare(bundle, seed=0)
>>> poisoned = attack.apply(images)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from . import register
from .base import Attack
from .generators import device_generator, pick_extra


@register("wanet")
@dataclass
class WaNet(Attack):
    k: int = 4  # side of the random control grid
    s: float = 0.5  # warping strength
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0  # noise-mode samples per poisoned sample (0 = none)

    name = "wanet"
    controls_training = True
    # For tests at ``smoke`` scale only (4 epochs), where the defaults are not learnt (see above).
    smoke_params: ClassVar[dict] = {"s": 2.0, "cross_ratio": 0.0}

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 2:
            raise ValueError(f"k (control grid side) must be an integer >= 2, got {self.k!r}")
        if not 0 <= self.s <= 10:
            raise ValueError(f"s (warping strength) must be in [0, 10], got {self.s}")
        if not 0 < self.grid_rescale <= 2:
            raise ValueError(f"grid_rescale must be in (0, 2], got {self.grid_rescale}")
        if not 0 <= self.cross_ratio <= 10:
            raise ValueError(f"cross_ratio must be in [0, 10], got {self.cross_ratio}")
        self._field: torch.Tensor | None = None  # float[1, 2, k, k]
        self._seed = 0
        self._gen: torch.Generator | None = None

    def validate(self, num_classes: int, shape: tuple[int, int, int] | None = None) -> None:
        super().validate(num_classes, shape)
        if shape is not None and min(shape[1:]) < self.k:
            raise ValueError(f"wanet: k={self.k} is larger than the image ({shape[1]}x{shape[2]})")

    # -- trigger ----------------------------------------------------------------------
    def prepare(self, data: Any, *, scale: Any = None, seed: int = 0, progress: bool = False) -> None:
        self._seed = seed
        self._field = self.random_field(self.k, seed)
        self._cache.clear()

    @staticmethod
    def random_field(k: int, seed: int) -> torch.Tensor:
        """The ``[1, 2, k, k]`` control offsets, uniform in [-1, 1], scaled to mean |.| = 1."""
        g = torch.Generator().manual_seed(seed)
        field = torch.rand(1, 2, k, k, generator=g) * 2 - 1
        return field / field.abs().mean()

    def grid(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """The warping grid ``float[1, H, W, 2]`` (x, y in [-1, 1]) for ``grid_sample``."""

        def build() -> torch.Tensor:
            if self._field is None:
                self._field = self.random_field(self.k, self._seed)
            noise = F.interpolate(self._field, size=(height, width), mode="bicubic", align_corners=True)
            noise = noise.permute(0, 2, 3, 1)  # [1, H, W, 2]
            return torch.clamp((identity_grid(height, width) + self.s * noise / height) * self.grid_rescale,
                               -1, 1).to(device)

        return self.cached(("grid", height, width, device), build)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.grid(x.shape[-2], x.shape[-1], x.device).to(x.dtype)
        return warp(x, grid.expand(len(x), -1, -1, -1))

    # -- training hooks -----------------------------------------------------------------
    def begin_training(self, model: Any, data: Any, recipe: Any) -> None:
        self._gen = device_generator(data.device, self._seed + 1)

    def training_batch(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor,
                       num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = x.shape
        grid = self.grid(h, w, x.device).to(x.dtype).expand(n, -1, -1, -1)
        cross = pick_extra(mask, self.cross_ratio * mask.sum(), self._gen)
        noise = torch.rand(n, h, w, 2, device=x.device, generator=self._gen, dtype=x.dtype) * 2 - 1
        grid = torch.where(cross.view(-1, 1, 1, 1), torch.clamp(grid + noise / h, -1, 1), grid)
        warped = warp(x, grid)
        x = torch.where((mask | cross).view(-1, 1, 1, 1), warped, x)
        y = torch.where(mask, self.target_labels(y, num_classes), y)
        return x, y

    # -- saved with the attacked model ------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self._field is None:
            self._field = self.random_field(self.k, self._seed)
        return {"field": self._field.clone()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != {"field"} or tuple(tensors["field"].shape) != (1, 2, self.k, self.k):
            raise ValueError(f"wanet expects a 'field' tensor of shape (1, 2, {self.k}, {self.k}), got "
                             f"{ {k: tuple(v.shape) for k, v in tensors.items()} }")
        self._field = tensors["field"].detach().float().cpu()
        self._cache.clear()


def identity_grid(height: int, width: int) -> torch.Tensor:
    """``float[1, H, W, 2]``: each pixel's own (x, y) position in [-1, 1]."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.stack((xs, ys), dim=-1)[None]


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resample a batch at ``grid`` (bilinear, corners aligned); stays in [0, 1]."""
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True).clamp_(0, 1)
