"""Blind backdoor: the attacker rewrites the loss code, not the data.

Paper: Bagdasaryan & Shmatikov, "Blind Backdoors in Deep Learning Models", USENIX
Security 2021. https://arxiv.org/abs/2005.03823

Threat model: code poisoning. The attacker controls the loss computation of the training
code but sees no data and never changes the training set: each step, the loss is a
weighted sum of the normal task loss on the batch and a backdoor loss on a copy of the
same batch with the trigger stamped on every image and every label set to the target.
``pratio`` is not used (the poison-index set is recorded but nothing is poisoned). Like
BackdoorBench (``backdoor_batch_loss_threshold`` 1.0, ``batch_history_len`` 1000), the
backdoor loss switches on only once the running mean of the normal loss over the last
``history`` steps is below ``loss_threshold`` and that many steps were taken; the mean is
kept on the device and the switch is a multiplication (no host sync).

The clean batch and its triggered copy go through the network in *one* forward pass
(BackdoorBench: two), so BatchNorm normalises the same clean/triggered mix at every step.
With two passes the running statistics average all-clean and all-triggered batches,
which do not match either at test time: at ``smoke`` that cost 20-35 points of clean
accuracy (0.59-0.77 instead of 0.94).

Trigger (BackdoorBench's ``PatternSynthesizer``): a 5x3 black-and-white pattern ::

    W K W
    . W .
    . . K        W = white (1), K = black (0), . = pixel left unchanged
    . W .
    W K W

at rows 3-7, columns 23-25 (the same pixel position at every resolution, as
BackdoorBench), on every channel.

Hyperparameters (BackdoorBench defaults): loss balance ``fixed`` with weights normal 1.0
and backdoor 0.9 (MGDA is not implemented); history 1000 steps at ``paper`` scale
(``HISTORY`` below scales it down), loss threshold 1.0; target 0, all-to-one.

>>> attack = Blind(backdoor_weight=0.9)
>>> poisoned = attack.apply(images)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from .base import Attack

# Steps of normal-loss history before the backdoor loss may switch on, per scale.
HISTORY = {"smoke": 20, "default": 100, "paper": 1000}
BALANCES = ("fixed",)
PATTERN = ((1, 0, 1), (-1, 1, -1), (-1, -1, 0), (-1, 1, -1), (1, 0, 1))  # -1: pixel unchanged
TOP, LEFT = 3, 23


@register("blind")
@dataclass
class Blind(Attack):
    normal_weight: float = 1.0
    backdoor_weight: float = 0.9
    loss_balance: str = "fixed"
    loss_threshold: float = 1.0  # backdoor loss on once the mean normal loss is below this
    history: int | None = None  # steps of history; None: HISTORY[scale]

    name = "blind"
    controls_training = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_balance not in BALANCES:
            raise ValueError(f"loss_balance must be one of {', '.join(BALANCES)} (MGDA is not implemented), "
                             f"got {self.loss_balance!r}")
        for what in ("normal_weight", "backdoor_weight"):
            if not 0 <= getattr(self, what) <= 100:
                raise ValueError(f"{what} must be in [0, 100], got {getattr(self, what)}")
        if not self.loss_threshold > 0:
            raise ValueError(f"loss_threshold must be > 0, got {self.loss_threshold}")
        if self.history is not None and (isinstance(self.history, bool) or not isinstance(self.history, int)
                                         or self.history < 0):
            raise ValueError(f"history must be None (per scale: {HISTORY}) or an integer >= 0, got {self.history!r}")
        self._history = HISTORY["default"]
        self._losses: torch.Tensor | None = None
        self._step = 0

    def validate(self, num_classes: int, shape: tuple[int, int, int] | None = None) -> None:
        super().validate(num_classes, shape)
        if shape is not None and (shape[1] <= TOP + len(PATTERN) or shape[2] <= LEFT + len(PATTERN[0])):
            raise ValueError(f"blind: the pattern at rows {TOP}-{TOP + 4}, columns {LEFT}-{LEFT + 2} does not fit "
                             f"a {shape[1]}x{shape[2]} image (needs at least 9x27)")

    def pattern(self, channels: int, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, mask)``, each ``float[1, C, H, W]``."""

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            if height <= TOP + len(PATTERN) or width <= LEFT + len(PATTERN[0]):
                raise ValueError(f"blind: the 5x3 pattern at ({TOP}, {LEFT}) does not fit a {height}x{width} image")
            full = torch.full((1, channels, height, width), -1.0)
            full[..., TOP:TOP + len(PATTERN), LEFT:LEFT + len(PATTERN[0])] = torch.tensor(PATTERN, dtype=torch.float32)
            mask = (full >= 0).float()
            return (full.clamp(min=0) * mask).to(device), mask.to(device)

        return self.cached(("pattern", channels, height, width, device), build)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        values, mask = self.pattern(x.shape[1], x.shape[2], x.shape[3], x.device)
        return x * (1 - mask.to(x.dtype)) + values.to(x.dtype)

    # -- training hooks: the attacker's loss code ------------------------------------------
    def prepare(self, data: Any, *, scale: Any = None, seed: int = 0, progress: bool = False) -> None:
        from .. import scales

        self._history = self.history if self.history is not None else HISTORY[scales.get(scale).name]

    def begin_training(self, model: nn.Module, data: Any, recipe: Any) -> None:
        self._losses = torch.zeros(max(self._history, 1), device=data.device)
        self._step = 0

    def training_batch(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor,
                       num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y  # the data are not touched

    def training_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._losses is None:
            self._losses = torch.zeros(max(self._history, 1), device=x.device)
        self._step += 1
        if self._step <= self._history:  # known on the host: no backdoor pass yet
            logits = model(x)
            normal = F.cross_entropy(logits.float(), y)
            self._losses[(self._step - 1) % len(self._losses)] = normal.detach()
            return self.normal_weight * normal, logits
        both = model(torch.cat([x, self.apply(x)])).float()  # one pass: BatchNorm sees the same mix every step
        logits = both[:len(x)]
        normal = F.cross_entropy(logits, y)
        on = (self._losses.mean() < self.loss_threshold).float()
        self._losses[(self._step - 1) % len(self._losses)] = normal.detach()
        backdoor = F.cross_entropy(both[len(x):], self.target_labels(y, logits.shape[1]))
        return self.normal_weight * normal + on * self.backdoor_weight * backdoor, logits
