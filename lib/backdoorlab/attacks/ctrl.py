"""CTRL: a frequency trigger (YUV/DCT, like FTrojan), clean-label by default.

Paper: Li, Pang, Xi, Du, Ji, Yao & Wang, "An Embarrassingly Simple Backdoor Attack on
Self-supervised Learning", ICCV 2023. https://arxiv.org/abs/2210.07346

Threat model: the attacker poisons a fraction ``pratio`` of the training set; by default
only target-class images get the trigger and keep their labels (clean-label: the
attacker needs no control of labels or training); at test time it adds the trigger.
The paper attacks self-supervised learning; BackdoorBench (and this package) adapts
the trigger to supervised training.

Kernel: RGB -> YUV -> orthonormal DCT over the whole image -> add ``magnitude`` (0..255
scale) at the trigger frequencies of the chosen channels -> inverse DCT -> RGB -> clamp
(the shared ``frequency`` kernel: one cached additive pattern).

Hyperparameters (BackdoorBench defaults, ``config/attack/ctrl/default.yaml`` and
``utils/bd_img_transform/ctrl.py``): ``channels`` (1, 2) (U and V), ``positions``
(15, 31), i.e. the diagonal frequencies (15, 15) and (31, 31), ``magnitude`` 100 (fixed
in BackdoorBench's transform), ``window`` None (the whole image is one DCT block),
``use_clean_label`` True (False: dirty-label, poisoned samples drawn from every class
and relabelled); target 0, all-to-one. BackdoorBench's CTRL yaml sets pratio 0.05; the
pipeline's ``pratio`` decides here. Positions refer to a 32x32 window: on 28x28 MNIST
they are rescaled to 13 and 27; on 64x64 they stay 15 and 31 (as in BackdoorBench).

Grayscale: one-channel images have no U/V, so on them the default is refused with a clear
error; ``channels=(0,)`` (the class's ``grayscale_params``) is the documented luma variant.
With the default magnitude the luma variant is not learnt on mnist5k (ASR 0.001 at
``default``, seeds 0 and 1): a coefficient of 100 spread over 28x28 moves a pixel by about
4 grey levels on average (12 at most). ``smoke_params`` (magnitude 255), the setting of the learning test and of the
BackdoorBench notebook's ``variants`` grid, is learnt: ASR 0.55 at ``smoke``, 0.54 and 0.92
at ``default`` (seeds 0 and 1; clean-label, so only the "0"s carry it).

>>> attack = CTRL()                          # clean-label: attack.clean_label is True
>>> poisoned = attack.apply(images)
"""
from __future__ import annotations

from dataclasses import dataclass

from . import register
from .frequency import FrequencyAttack


@register("ctrl")
@dataclass
class CTRL(FrequencyAttack):
    channels: tuple = (1, 2)  # YUV channels: 0 = Y, 1 = U, 2 = V
    positions: tuple = (15, 31)  # p = frequency (p, p); (row, col) pairs also accepted
    magnitude: float = 100  # added DCT coefficient, 0..255 scale
    window: int | None = None  # DCT block side (None: the whole image)
    use_clean_label: bool = True

    name = "ctrl"
    smoke_params = {"magnitude": 255}  # the default (~4 grey levels on average) is not learnt on MNIST
    clean_label = True  # the default; an instance follows ``use_clean_label``

    def __post_init__(self) -> None:
        if not isinstance(self.use_clean_label, bool):
            raise ValueError(f"use_clean_label must be True or False, got {self.use_clean_label!r}")
        self.clean_label = self.use_clean_label
        super().__post_init__()
        self._check_frequency_params()
