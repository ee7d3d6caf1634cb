"""LF (low frequency): a smooth universal adversarial perturbation as the trigger.

Paper: Zeng, Park, Mao & Jia, "Rethinking the Backdoor Attacks' Triggers: A Frequency
Perspective", ICCV 2021. https://arxiv.org/abs/2104.03413

Threat model: dirty-label data poisoning. The attacker owns a clean surrogate model and
a fraction ``pratio`` of the training set (trigger added, label set to the target); no
control over training. The trigger is one additive pattern ``v`` with no high-frequency
content (so frequency-based detectors miss it), made to push the surrogate towards the
target class: ``x' = clip(x + v, 0, 1)``.

Hyperparameters: BackdoorBench builds ``v`` as a targeted universal perturbation (DeepFool
steps on 100 random training images, up to 50 passes) smoothed after every update by a
Gaussian low-pass (std 6 px, 30 taps, at 32x32) and rescaled to a range of 0.2. Here:
``eps`` 0.1 (L-inf bound, i.e. the same 0.2 peak-to-peak), ``sigma`` 6 px at 32x32
(scaled with the resolution), target 0, all-to-one (all-to-all: untargeted), pratio 0.1.

Algorithm (ours, batched, in place of DeepFool's per-image loop): projected gradient
descent on the mean target cross-entropy over ``images`` random non-target training
images (batches of 128). Each step's gradient is Gaussian low-pass filtered and scaled to
a max-abs of ``step_size``, so ``v`` is a sum of filtered maps and stays exactly
low-pass; the projection rescales ``v`` into the L-inf ball (never clips it, which would
add high frequencies). Steps per scale: ``UAP_STEPS``. The surrogate is the
package's clean PreAct-ResNet18 (``clean_surrogate``); ``v`` is cached in the zoo.

>>> attack = LF(eps=0.1)
>>> attack.prepare(bundle, scale="smoke")
>>> poisoned = attack.apply(images)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .. import __version__, scales, zoo
from . import register
from .base import Attack

# Optimisation steps per scale (BackdoorBench: up to 50 passes of DeepFool over 100 images).
UAP_STEPS = {"smoke": 30, "default": 200, "paper": 1000}
BATCH = 128


@register("lf")
@dataclass
class LF(Attack):
    eps: float = 0.1  # L-inf bound of the pattern
    sigma: float = 6.0  # Gaussian low-pass std, pixels at 32x32
    images: int = 1000  # training images the pattern is fitted on
    step_size: float = 0.01  # per-step change of the pattern (max abs)

    name = "lf"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.eps <= 1:
            raise ValueError(f"eps must be in (0, 1] (an L-inf bound on [0, 1] images), got {self.eps}")
        if not 0 < self.sigma <= 32:
            raise ValueError(f"sigma must be in (0, 32] (pixels at 32x32), got {self.sigma}")
        if isinstance(self.images, bool) or not isinstance(self.images, int) or self.images < 1:
            raise ValueError(f"images must be an integer >= 1, got {self.images!r}")
        if not 0 < self.step_size <= 1:
            raise ValueError(f"step_size must be in (0, 1], got {self.step_size}")

    def validate(self, num_classes: int, shape: tuple[int, int, int] | None = None) -> None:
        super().validate(num_classes, shape)
        if shape is not None and min(shape[1:]) < 4:
            raise ValueError(f"lf needs images of at least 4x4 pixels, got {shape[1]}x{shape[2]}")

    def prepare(self, data: Any, *, scale: Any = None, seed: int = 0, progress: bool = False) -> None:
        """Fit the low-frequency pattern against the clean surrogate (once; then from the zoo)."""
        self.validate(data.num_classes, data.shape)
        preset = scales.get(scale)
        steps = UAP_STEPS[preset.name]
        key = {"role": "lf-pattern", "dataset": data.name, "shape": list(data.shape), "n_train": len(data.train_y),
               "seed": seed, "scale": preset.name, "steps": steps, "batch": BATCH, "params": self.params(),
               "surrogate": {"model": "preactresnet18", "width": preset.width}, "version": __version__}
        label = f"lf-pattern-{data.name}-s{seed}-{preset.name}"

        def build() -> dict[str, torch.Tensor]:
            from .surrogate import clean_surrogate

            model = clean_surrogate(data, scale=preset, seed=seed, progress=progress)
            return {"pattern": self._fit(model, data, steps, seed)}

        self._cache["pattern"] = zoo.cached_tensors(label, key, build, data.device)["pattern"]

    def _fit(self, model: torch.nn.Module, data: Any, steps: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        pool = torch.randperm(len(data.train_y), generator=g)[:self.images].to(data.device)
        if self.label_mode == "all2one":
            pool = pool[data.train_y[pool] != self.target]
        c, h, w = data.shape
        blur = lowpass_kernel(self.sigma * h / 32, h, w)
        v = torch.zeros(1, c, h, w, device=data.device)
        for step in range(steps):
            pick = pool[torch.randint(len(pool), (min(BATCH, len(pool)),), generator=g).to(data.device)]
            x, y = data.train_x[pick].float() / 255, data.train_y[pick]
            v.requires_grad_(True)
            logits = model((x + v).clamp(0, 1))
            if self.label_mode == "all2one":
                loss = F.cross_entropy(logits, torch.full_like(y, self.target))
            else:  # untargeted: away from the true class
                loss = -F.cross_entropy(logits, y)
            (grad,) = torch.autograd.grad(loss, v)
            smooth = lowpass(grad, blur)
            v = v.detach() - self.step_size * smooth / smooth.abs().amax().clamp_min(1e-12)
            v = v * (self.eps / v.abs().amax().clamp_min(self.eps))  # rescale into the ball
        return v[0].detach()

    def trigger(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if "pattern" not in self._cache:
            raise RuntimeError("lf: call prepare(data, scale=..., seed=...) first: it fits the low-frequency pattern "
                               "against a clean surrogate")
        return self.cached(("pattern", device, dtype), lambda: self._cache["pattern"].to(device, dtype)[None])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        v = self.trigger(x.device, x.dtype)
        if v.shape[1:] != x.shape[1:]:
            raise ValueError(f"lf: the pattern was prepared for images {tuple(v.shape[1:])}, got {tuple(x.shape[1:])}")
        return (x + v).clamp(0, 1)


def lowpass_kernel(sigma: float, height: int, width: int) -> torch.Tensor:
    """A normalised 1-D Gaussian of std ``sigma`` (radius 2.5 sigma, at most the image side - 1)."""
    radius = max(1, min(math.ceil(2.5 * sigma), min(height, width) - 1))
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    return k / k.sum()


def lowpass(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur per channel with reflected borders."""
    c, r = x.shape[1], len(kernel) // 2
    k = kernel.to(x.device, x.dtype)
    kx = k.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    ky = k.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), kx, groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), ky, groups=c)
