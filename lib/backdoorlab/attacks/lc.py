"""LC (label-consistent): adversarially perturbed target-class images carry a corner trigger.

Paper: Turner, Tsipras & Madry, "Label-Consistent Backdoor Attacks", 2019.
https://arxiv.org/abs/1912.02771

Threat model: clean-label data poisoning. The attacker owns a (clean) surrogate model
and a fraction ``pratio`` of the training set, drawn from the target class only; it
may perturb those images but never changes a label, and has no control over training.
The perturbation (L-inf PGD away from the true class) makes the poisoned images hard to
classify by their content, so the model leans on the trigger instead. At test time the
trigger alone (no perturbation) is stamped on non-target images.

Hyperparameters (BackdoorBench defaults, its ``craft_adv_dataset.py``): untargeted L-inf
PGD with ``eps`` 8/255 (the paper also reports 16/255), step 1.5/255, 100 steps, no
random start; the trigger is a 3x3 black-and-white checkerboard (corner pixels white)
in all four corners, ``reduced_amplitude`` 1 (full amplitude: the patch replaces the
pixels; ``a < 1`` blends ``x + a (p - x)``). Target 0, all-to-one, pratio 0.1.

Deviations: the paper and BackdoorBench attack an *adversarially trained* ResNet18 (and
the paper also uses GAN interpolation); here PGD runs against the package's clean
surrogate (``clean_surrogate``: PreAct-ResNet18 of the scale's width, cached in the zoo),
with the scale's step budget (``PGD_STEPS``). The crafted images are kept in the zoo
as uint8, keyed by dataset, seed, scale and hyperparameters.

On mnist5k the paper defaults are not reliably learnt: with pratio 0.1 every "0" is
poisoned, and the model leans on the PGD noise on the black background as much as on
the trigger (smoke ASR 0.08 / 0.70 / 0.49 for seeds 0-2; default 0.08 and 0.95; an
adversarially trained surrogate, as in the paper, did not change this). A larger radius
makes it worse, not better: eps 8/255 fools the smoke surrogate on only 7 % of the "0"s
(2.8 % clean), eps 0.1 on 56 %, eps 0.3 (MNIST's usual budget) on all of them, yet at
``default`` eps 0.1 and 0.3 give ASR 0.000-0.001 for seeds 0 and 1: the model learns
"noisy background means 0" and then misses the clean test "0"s (ACC 0.882; 0.00 of the
clean test "0"s right at eps 0.3, 0.03 at the default 8/255, seed 0). Note the PGD reach: ``steps * step_size`` caps the perturbation (0.059 at smoke's
10 steps of 1.5/255), so a larger ``eps`` also needs a larger ``step_size``. ``smoke_params``
(``patch_size`` 6, i.e. 5x5 checkerboards at 28x28) is the setting of the learning test
and of the BackdoorBench notebook's ``variants`` grid; it is learnt (ASR 0.82-0.85 at
``smoke`` over seeds 0-2 with 2 threads, 0.65 with 1; 0.95 and 1.00 at ``default``,
seeds 0 and 1).

>>> attack = LC(eps=8 / 255)
>>> attack.prepare(bundle, scale="smoke")     # crafts the target class once (cached)
>>> poisoned = attack.apply(images)           # test time: trigger only
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .. import __version__, scales, zoo
from . import register
from .base import Attack

# PGD steps per scale ("paper": BackdoorBench's craft script).
PGD_STEPS = {"smoke": 10, "default": 40, "paper": 100}
CHUNK = 256  # images per PGD batch
CORNERS = (1, 4)
NEEDS_PREPARE = "lc: call prepare(data, scale=..., seed=...) before training: it crafts the adversarial images"


@register("lc")
@dataclass
class LC(Attack):
    eps: float = 8 / 255  # L-inf radius of the PGD perturbation
    step_size: float = 1.5 / 255  # PGD step
    reduced_amplitude: float = 1.0  # trigger amplitude (1 = full)
    patch_size: int = 3  # checkerboard side at 32x32 resolution
    corners: int = 4  # 4: all corners, 1: bottom-right only

    name = "lc"
    clean_label = True
    smoke_params: ClassVar[dict] = {"patch_size": 6}  # learning test and `variants` grid: 3x3 is not reliably learnt

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.eps <= 1:
            raise ValueError(f"eps must be in [0, 1] (an L-inf radius on [0, 1] images, e.g. 8/255), got {self.eps}")
        if not 0 < self.step_size <= 1:
            raise ValueError(f"step_size must be in (0, 1], got {self.step_size}")
        if not 0 < self.reduced_amplitude <= 1:
            raise ValueError(f"reduced_amplitude must be in (0, 1], got {self.reduced_amplitude}")
        if isinstance(self.patch_size, bool) or not isinstance(self.patch_size, int) or not 1 <= self.patch_size <= 32:
            raise ValueError(f"patch_size must be an integer in 1..32, got {self.patch_size!r}")
        if self.corners not in CORNERS:
            raise ValueError(f"corners must be one of {', '.join(map(str, CORNERS))}, got {self.corners!r}")

    def validate(self, num_classes: int, shape: tuple[int, int, int] | None = None) -> None:
        super().validate(num_classes, shape)
        if shape is not None:
            side = self._side(shape[1])
            need = 2 * side if self.corners == 4 else side
            if need > min(shape[1:]):
                raise ValueError(f"lc: a {side}x{side} patch in {self.corners} corner(s) does not fit a "
                                 f"{shape[1]}x{shape[2]} image; lower patch_size")

    # -- trigger ---------------------------------------------------------------------
    def _side(self, height: int) -> int:
        return max(1, round(self.patch_size * height / 32))

    def pattern(self, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask, values)``, each ``float[1, 1, H, W]``: where the checkerboards sit and their 0/1 pixels."""

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            s = self._side(height)
            r = torch.arange(s, device=device)
            board = ((r[:, None] + r[None, :]) % 2 == 0).float()  # corner pixels white
            mask = torch.zeros(1, 1, height, width, device=device)
            values = torch.zeros_like(mask)
            spots = [(height - s, width - s)]
            if self.corners == 4:
                spots += [(0, 0), (0, width - s), (height - s, 0)]
            for top, left in spots:
                mask[..., top:top + s, left:left + s] = 1.0
                values[..., top:top + s, left:left + s] = board
            return mask, values

        return self.cached(("pattern", height, width, device), build)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The test-time trigger (no adversarial perturbation); needs no ``prepare``."""
        mask, values = self.pattern(x.shape[-2], x.shape[-1], x.device)
        a = self.reduced_amplitude * mask.to(x.dtype)
        return (x + a * (values.to(x.dtype) - x)).clamp(0, 1)

    # -- crafting ------------------------------------------------------------------------
    def prepare(self, data: Any, *, scale: Any = None, seed: int = 0, progress: bool = False) -> None:
        """Craft PGD versions of every target-class training image against the clean
        surrogate (once per setting; then loaded from the zoo)."""
        self.validate(data.num_classes, data.shape)
        preset = scales.get(scale)
        steps = PGD_STEPS[preset.name]
        index = torch.nonzero(data.train_y == self.target).squeeze(1)
        key = {"role": "lc-adversarial", "dataset": data.name, "shape": list(data.shape),
               "n_train": len(data.train_y), "seed": seed, "scale": preset.name, "steps": steps,
               "eps": self.eps, "step_size": self.step_size, "target": self.target,
               "surrogate": {"model": "preactresnet18", "width": preset.width}, "version": __version__}
        label = f"lc-adv-{data.name}-s{seed}-{preset.name}"

        def build() -> dict[str, torch.Tensor]:
            from .surrogate import clean_surrogate

            model = clean_surrogate(data, scale=preset, seed=seed, progress=progress)
            adv = craft_pgd(model, data.train_x[index], data.train_y[index], self.eps, self.step_size, steps)
            return {"index": index, "adversarial": adv}

        tensors = zoo.cached_tensors(label, key, build, data.device)
        slot = torch.full((len(data.train_y),), -1, dtype=torch.int64, device=data.device)
        slot[tensors["index"]] = torch.arange(len(tensors["index"]), device=data.device)
        self._cache["slot"], self._cache["adversarial"] = slot, tensors["adversarial"]

    def begin_training(self, model: Any, data: Any, recipe: Any) -> None:
        if "slot" not in self._cache:
            raise RuntimeError(NEEDS_PREPARE)
        if len(self._cache["slot"]) != len(data.train_y):
            raise ValueError(f"lc: prepared on {len(self._cache['slot'])} training images, training on "
                             f"{len(data.train_y)}; prepare on the same data")

    def training_batch(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor,
                       num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Poisoned samples: their crafted adversarial version, then the trigger."""
        if "slot" not in self._cache:
            raise RuntimeError(NEEDS_PREPARE)
        slot = self._cache["slot"]
        s = slot[idx.to(slot.device)].to(x.device)
        adv = self._cache["adversarial"].to(x.device)[s.clamp(min=0)].to(x.dtype) / 255
        m = (mask & (s >= 0)).view(-1, 1, 1, 1)
        x = torch.where(m, adv, x)
        return self.poison_batch(x, y, mask, num_classes)


def craft_pgd(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, step: float,
              steps: int) -> torch.Tensor:
    """Untargeted L-inf PGD (no random start) on uint8 ``images``, batched in chunks;
    returns uint8 adversarial images within ``eps`` of the originals."""
    out = []
    for start in range(0, len(images), CHUNK):
        x0 = images[start:start + CHUNK].float() / 255
        y = labels[start:start + CHUNK]
        x = x0.clone()
        for _ in range(steps):
            x.requires_grad_(True)
            loss = F.cross_entropy(model(x), y)
            (grad,) = torch.autograd.grad(loss, x)
            x = torch.min(torch.max(x.detach() + step * grad.sign(), x0 - eps), x0 + eps).clamp_(0, 1)
        out.append((x * 255).round_().to(torch.uint8))
    return torch.cat(out) if out else images.new_empty((0, *images.shape[1:]))
