"""FTrojan: an invisible trigger planted in the image's frequency domain.

Paper: Wang, Yao, Xu, An, Tong & Wang, "An Invisible Black-box Backdoor Attack through
Frequency Domain", ECCV 2022. https://arxiv.org/abs/2207.04209

Threat model: the attacker poisons a fraction ``pratio`` of the training set (trigger
added, label set to the target: dirty-label) and has no control over training; at test
time it adds the same trigger. The trigger changes each pixel by a few grey levels.

Kernel: RGB -> YUV -> orthonormal DCT of every ``window x window`` block -> add
``magnitude`` (on the 0..255 scale) at the trigger frequencies of the chosen channels in
every block -> inverse DCT -> RGB -> clamp (see ``frequency``: the DCT is a matrix
product and, the pipeline being linear, the batch kernel is ``clamp(x + pattern)``).

Hyperparameters (BackdoorBench defaults, ``config/attack/ftrojannn/default.yaml``):
``channels`` (1, 2) (U and V), ``positions`` ((15, 15), (31, 31)) (a mid and the highest
frequency of a 32x32 block), ``magnitude`` 30, ``window`` 32; target 0, all-to-one,
pratio 0.1. On images smaller than the window (28x28 MNIST) the window is the image and
positions are rescaled to (13, 13) and (27, 27); on 64x64 the 32x32 blocks tile the image.
Differences from BackdoorBench: it converts with OpenCV's YCrCb (chroma scaled by 0.713 /
0.564 instead of 0.877 / 0.492) and rounds poisoned images to uint8; here the poisoned
images stay float.

Grayscale: one-channel images have no U/V, so on them the default is refused with a clear
error; ``channels=(0,)`` (the class's ``grayscale_params``) is the documented luma variant.
With the default magnitude 30 it moves a 28x28 pixel by about 1.3 grey levels on average
(3.7 at most), and on mnist5k at ``default`` it is learnt for seed 0 (ASR 1.000) but not
for seed 1 (0.008). ``smoke_params`` (magnitude 255), the setting of the learning test and
of the BackdoorBench notebook's ``variants`` grid, is learnt (ASR 1.0 at ``smoke``).

>>> attack = FTrojan(magnitude=30)
>>> poisoned = attack.apply(images)          # float[B, C, H, W] in [0, 1]
"""
from __future__ import annotations

from dataclasses import dataclass

from . import register
from .frequency import FrequencyAttack


@register("ftrojan")
@dataclass
class FTrojan(FrequencyAttack):
    channels: tuple = (1, 2)  # YUV channels: 0 = Y, 1 = U, 2 = V
    positions: tuple = ((15, 15), (31, 31))  # (row, col) DCT frequencies in a window
    magnitude: float = 30  # added DCT coefficient, 0..255 scale
    window: int | None = 32  # DCT block side (None: the whole image)

    name = "ftrojan"
    smoke_params = {"magnitude": 255}  # the default (~1 grey level on average) is not reliably learnt on MNIST

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_frequency_params()
